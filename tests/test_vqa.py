"""The VQA model: key layout and remapping from pretraining checkpoints, training loss, answer ranking."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from albef.checkpoint import (
    build_model,
    convert_official_state_dict,
    decoder_from_encoder,
    load_for_task,
    load_official,
    load_pretrained,
    save_pretrained,
)
from albef.config import base_config, tiny_config
from albef.models.pretrain import ALBEFPretrain
from albef.models.vqa import ALBEFVQA, answer_sequence_loss, answer_targets
from albef.parity import check_reference, reference_config, vqa_reference_config

OFFICIAL = Path(__file__).parent / "official"


@pytest.fixture(scope="module")
def vqa_ref():
    return torch.load(OFFICIAL / "albef_ref_vqa.pt", weights_only=True)


@pytest.fixture(scope="module")
def pretrain_ref():
    return torch.load(OFFICIAL / "albef_ref_pretrain.pt", weights_only=True)


def _batch(cfg, n_questions=2, answers=(2, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    t = cfg.text
    images = torch.randn(n_questions, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    q_ids = torch.randint(4, t.vocab_size, (n_questions, 6), generator=g)
    q_ids[:, 0] = t.cls_token_id
    q_mask = torch.ones_like(q_ids)
    q_mask[1, 4:] = 0
    q_ids[1, 4:] = t.pad_token_id
    n = sum(answers)
    a_ids = torch.randint(4, t.vocab_size, (n, 4), generator=g)
    a_ids[:, 0] = t.cls_token_id
    a_ids[:, 2] = t.sep_token_id
    a_ids[:, 3] = t.pad_token_id
    a_mask = (a_ids != t.pad_token_id).long()
    return images, q_ids, q_mask, a_ids, a_mask, list(answers), torch.rand(n, generator=g)


def test_full_size_pretraining_checkpoint_remaps_as_the_official_vqa_script():
    # ALBEF-SPEC §5.3, measured on the official code: 0 missing; unexpected = temp, queues, queue_ptr,
    # vision_proj(_m), text_proj(_m), itm_head.
    cfg = base_config()
    with torch.device("meta"):
        pretrain = build_model("pretrain", cfg)
        vqa = build_model("vqa", cfg)
    state = pretrain.state_dict()
    _, report = convert_official_state_dict(state, vqa)
    assert report.missing == []
    prefixes = {k.split(".")[0] for k in report.unexpected}
    assert prefixes == {
        "temp",
        "image_queue",
        "text_queue",
        "queue_ptr",
        "vision_proj",
        "vision_proj_m",
        "text_proj",
        "text_proj_m",
        "itm_head",
    }
    mapped, created = decoder_from_encoder(
        {
            "text_encoder.bert.encoder.layer.5.output.dense.weight": torch.zeros(1),
            "text_encoder.bert.encoder.layer.7.crossattention.self.query.weight": torch.ones(1),
            "text_encoder_m.bert.embeddings.LayerNorm.bias": torch.ones(2),
            "text_encoder.cls.predictions.bias": torch.ones(3),
        },
        text_layers=6,
        decoder_layers=6,
    )
    assert sorted(created) == [
        "text_decoder.bert.encoder.layer.1.crossattention.self.query.weight",
        "text_decoder.cls.predictions.bias",
        "text_decoder_m.bert.embeddings.LayerNorm.bias",
    ]
    # the encoder keeps every layer and the embeddings; the MLM head moves to the decoder
    assert "text_encoder.bert.encoder.layer.5.output.dense.weight" in mapped
    assert "text_encoder.bert.encoder.layer.7.crossattention.self.query.weight" in mapped
    assert "text_encoder_m.bert.embeddings.LayerNorm.bias" in mapped
    assert "text_encoder.cls.predictions.bias" not in mapped


def test_tiny_pretraining_checkpoint_initialises_the_decoder_from_the_fusion_layers(pretrain_ref):
    cfg = reference_config(pretrain_ref)
    cfg.text.decoder_layers = cfg.text.fusion_layers
    model = ALBEFVQA(cfg)
    report = load_official(model, pretrain_ref["state_dict"], strict=True)
    assert report.missing == [] and report.decoder_from_encoder
    sd = pretrain_ref["state_dict"]
    start = cfg.text.text_layers
    for suffix in ("", "_m"):
        dec = getattr(model, f"text_decoder{suffix}")
        enc = getattr(model, f"text_encoder{suffix}")
        for j in range(cfg.text.decoder_layers):
            src = f"text_encoder{suffix}.bert.encoder.layer.{start + j}.crossattention.self.key.weight"
            torch.testing.assert_close(dec.bert.encoder.layer[j].crossattention.self.key.weight, sd[src])
        torch.testing.assert_close(
            dec.cls.predictions.transform.dense.weight,
            sd[f"text_encoder{suffix}.cls.predictions.transform.dense.weight"],
        )
        torch.testing.assert_close(
            dec.bert.embeddings.word_embeddings.weight, enc.embeddings.word_embeddings.weight
        )
        assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight
        assert dec.cls.predictions.decoder.bias is dec.cls.predictions.bias
        torch.testing.assert_close(
            enc.encoder.layer[0].attention.self.query.weight,
            sd[f"text_encoder{suffix}.bert.encoder.layer.0.attention.self.query.weight"],
        )
    # a decoder deeper than the fusion stack cannot be filled from it: reported, never invented
    cfg.text.decoder_layers = cfg.text.fusion_layers + 1
    report = load_official(ALBEFVQA(cfg), pretrain_ref["state_dict"])
    assert any(".layer.2." in k and k.startswith("text_decoder.") for k in report.missing)


def test_released_vqa_layout_without_momentum(vqa_ref):
    cfg = vqa_reference_config(vqa_ref)
    state = {"module." + k: v for k, v in vqa_ref["state_dict"].items() if not k.split(".")[0].endswith("_m")}
    model = ALBEFVQA(cfg)
    report = load_official(model, {"model": state}, strict=True)
    assert not report.missing and not report.unexpected and not report.decoder_from_encoder
    assert any(k.startswith("text_decoder_m.") for k in report.momentum_from_online)
    torch.testing.assert_close(
        model.text_decoder_m.cls.predictions.bias, vqa_ref["state_dict"]["text_decoder.cls.predictions.bias"]
    )


def test_albef_pretraining_export_starts_a_vqa_finetune(tmp_path):
    cfg = tiny_config()
    cfg.text.decoder_layers = cfg.text.fusion_layers
    torch.manual_seed(0)
    pre = ALBEFPretrain(cfg)
    save_pretrained(pre, tmp_path / "pre")
    model, report = load_for_task(tmp_path / "pre", "vqa")
    assert isinstance(model, ALBEFVQA) and report is not None and report.decoder_from_encoder
    torch.testing.assert_close(
        model.text_decoder.bert.encoder.layer[0].output.dense.weight,
        pre.text_encoder.bert.encoder.layer[cfg.text.text_layers].output.dense.weight,
    )
    save_pretrained(model, tmp_path / "vqa")
    again = load_pretrained(tmp_path / "vqa")
    assert isinstance(again, ALBEFVQA)
    assert (
        again.text_decoder.cls.predictions.decoder.weight
        is again.text_decoder.bert.embeddings.word_embeddings.weight
    )
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_training_loss_backpropagates_and_momentum_moves():
    cfg = tiny_config()
    cfg.text.decoder_layers = 2
    torch.manual_seed(0)
    model = ALBEFVQA(cfg).train()
    images, q_ids, q_mask, a_ids, a_mask, k, w = _batch(cfg)
    with torch.no_grad():  # make online and momentum differ, so the EMA step is visible
        model.text_decoder.cls.predictions.bias.add_(1.0)
    before = model.text_decoder_m.cls.predictions.bias.detach().clone()
    out = model(images, q_ids, q_mask, a_ids, a_mask, k, w, alpha=0.4)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.answer_loss.shape == (3,)
    assert out.teacher_logits.shape == (3, 3, cfg.text.vocab_size)
    assert model.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight.grad is not None
    assert model.visual_encoder.patch_embed.proj.weight.grad is not None
    assert model.text_decoder_m.cls.predictions.bias.grad is None
    torch.testing.assert_close(
        model.text_decoder_m.cls.predictions.bias.detach(), before + (1 - cfg.momentum) * 1.0
    )
    torch.testing.assert_close(out.loss.detach(), (w * out.answer_loss).sum() / 2)
    with pytest.raises(ValueError, match="sum\\(k\\)"):
        model(images, q_ids, q_mask, a_ids, a_mask, [1, 1], w)


def test_without_distillation_there_are_no_momentum_twins():
    cfg = tiny_config()
    cfg.distill = False
    cfg.text.decoder_layers = 1
    model = ALBEFVQA(cfg).eval()
    assert not any(k.split(".")[0].endswith("_m") for k in model.state_dict())
    images, q_ids, q_mask, a_ids, a_mask, k, w = _batch(cfg)
    out = model(images, q_ids, q_mask, a_ids, a_mask, k, w)
    assert out.teacher_logits is None and torch.isfinite(out.loss)
    model.momentum_update()  # nothing to update: a no-op, not an error


def test_answer_loss_ignores_padding_and_distills():
    logits = torch.randn(2, 3, 7)
    ids = torch.tensor([[1, 4, 2, 0], [1, 5, 6, 2]])
    targets = answer_targets(ids, pad_token_id=0)
    assert targets.tolist() == [[4, 2, -100], [5, 6, 2]]
    ce = answer_sequence_loss(logits, targets)
    logp = logits.log_softmax(-1)
    torch.testing.assert_close(ce[0], -(logp[0, 0, 4] + logp[0, 1, 2]))
    soft = torch.softmax(torch.randn(2, 3, 7), -1)
    mixed = answer_sequence_loss(logits, targets, soft, alpha=0.25)
    distill0 = -(logp[0, :2] * soft[0, :2]).sum()
    torch.testing.assert_close(mixed[0], 0.75 * ce[0] + 0.25 * distill0)


def test_rank_answer_orders_and_clamps_k(vqa_ref):
    cfg = vqa_reference_config(vqa_ref)
    model = ALBEFVQA(cfg).eval()
    load_official(model, vqa_ref["state_dict"], strict=True)
    inp = vqa_ref["inputs"]
    ids, probs = model.predict(
        inp["image"],
        inp["question_ids"],
        inp["question_mask"],
        inp["answer_list_ids"],
        inp["answer_list_mask"],
        k=50,
    )
    assert ids.shape == (2, 5)  # k clamped to the answer list
    assert torch.all(probs[:, :-1] >= probs[:, 1:])
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    assert sorted(ids[0].tolist()) == list(range(5))


def test_a_wrong_vqa_value_is_caught(tmp_path, vqa_ref):
    ref = {k: dict(v) if isinstance(v, dict) else v for k, v in vqa_ref.items()}
    ref["outputs"]["topk_ids"] = ref["outputs"]["topk_ids"].flip(1)
    ref["train"]["logits_m"] = ref["train"]["logits_m"] + 1e-4
    bad = tmp_path / "albef_ref_vqa.pt"
    torch.save(ref, bad)
    report = check_reference(bad)
    assert not report.ok
    failures = "\n".join(report.failures())
    assert "outputs/topk_ids" in failures and "train/logits_m" in failures


# ----------------------------------------------------------------------------- stages on synthetic data


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory):
    """A tiny synthetic VQA benchmark, preprocessed into shards with its tokenizer."""
    from albef.data.stages import preprocess_stage, synth_stage

    root = tmp_path_factory.mktemp("vqa_data")
    zero = ("pretrain", "retrieval_train", "retrieval_val", "retrieval_test", "ve", "grounding")
    synth = {f"{name}_images": 0 for name in zero}
    synth.update(
        out=str(root / "synth"),
        seed=3,
        image_size=48,
        vqa_train_images=4,
        vqa_test_images=2,
        nlvr_pairs=0,
        workers=1,
    )
    params = {
        "synth": synth,
        "preprocess": {
            "image_root": str(root / "synth"),
            "out_dir": str(root / "processed"),
            "files": {"vqa_train.json": "vqa", "vqa_test.json": "vqa"},
            "answer_list": "answer_list.json",
            "copy": ["answer_list.json", "vqa_test_answers.json"],
            "max_side": 48,
            "shard_size": 32,
            "workers": 1,
        },
        "tokenizer": {"vocab_size": 300, "train_files": ["vqa_train.json", "vqa_test.json"]},
    }
    synth_stage(params, progress=False)
    preprocess_stage(params, progress=False)
    return root / "processed"


def test_vqa_accuracy_counts_three_humans_as_full_credit():
    from albef.eval.vqa import score_predictions, vqa_accuracy

    humans = ["red"] * 2 + ["Blue "] * 8
    assert vqa_accuracy("red", humans) == pytest.approx(2 / 3)
    assert vqa_accuracy("blue", humans) == 1.0
    assert vqa_accuracy("green", humans) == 0.0
    scored = score_predictions(
        [{"question_id": 1, "answer": "red"}, {"question_id": 2, "answer": "x"}], {"1": humans}
    )
    assert scored == {
        "accuracy": pytest.approx(66.667, abs=1e-3),
        "scored_questions": 1,
        "unscored_questions": 1,
    }


def test_answer_weights_follow_the_official_rule():
    from albef.data.vqa import answer_weights

    answers, weights = answer_weights({"question_id": 1, "answer": ["a", "b", "a", "a"], "dataset": "vqa"})
    assert answers == ["a", "b"] and weights == pytest.approx([0.75, 0.25])
    assert answer_weights({"question_id": 2, "answer": "tree", "dataset": "vg"}) == (["tree"], [0.5])


def test_finetune_evaluate_and_predict_vqa(vqa_data, tmp_path, capsys):
    import json

    from albef.cli import main as cli_main
    from albef.eval.stages import evaluate_vqa_stage
    from albef.train.vqa import finetune_vqa_stage

    tokenizer_vocab = len(
        json.loads((vqa_data / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    )
    model = {
        "preset": "tiny",
        "text": {
            "vocab_size": max(tokenizer_vocab, 300),
            "cls_token_id": 2,
            "sep_token_id": 3,
            "mask_token_id": 4,
            "decoder_layers": 1,
        },
        "queue_size": 16,
    }
    params = {
        "model": model,
        "finetune_vqa": {
            "data_dir": str(vqa_data),
            "batch_size": 4,
            "epochs": 1,
            "lr": 1e-3,
            "warmup_stair": 1,
            "num_workers": 0,
            "log_every": 1,
            "hflip": False,
            "out": str(tmp_path / "models" / "vqa"),
            "run_dir": str(tmp_path / "runs" / "vqa"),
            "metrics": str(tmp_path / "metrics.json"),
        },
        "evaluate_vqa": {"data_dir": str(vqa_data), "k_test": 4, "batch_size": 4},
    }
    metrics = finetune_vqa_stage(params, progress=False)
    assert metrics["steps"] >= 1 and "loss_vqa" in metrics
    assert metrics["train_answers"]["unknown_answers"] == 0  # the synthetic answer list covers training
    exported = tmp_path / "models" / "vqa"
    assert (exported / "answer_list.json").is_file() and (exported / "tokenizer").is_dir()

    result = evaluate_vqa_stage(params, exported, tmp_path / "eval", tmp_path / "eval_metrics.json")
    assert result["questions"] == result["scored_questions"] > 0
    assert 0.0 <= result["accuracy"] <= 100.0 and result["answer_list_oracle_accuracy"] == 100.0
    # the question-only baseline, trained on the questions finetune_vqa trained on
    assert 0.0 <= result["question_only_accuracy"] <= 100.0
    train_questions = len(json.loads((vqa_data / "vqa_train.json").read_text()))
    assert result["question_only"]["train_questions"] == train_questions
    predictions = json.loads((tmp_path / "eval" / "vqa_result.json").read_text())
    answer_list = json.loads((vqa_data / "answer_list.json").read_text())
    assert len(predictions) == result["questions"] and all(p["answer"] in answer_list for p in predictions)

    record = json.loads((vqa_data / "vqa_test.json").read_text())[0]
    from albef.data.datasets import image_source

    image = tmp_path / "q.png"
    image_source(vqa_data).open(record["image"]).save(image)
    assert (
        cli_main(
            [
                "predict",
                "vqa",
                "--model",
                str(exported),
                "--image",
                str(image),
                "--question",
                record["question"],
                "--k",
                "3",
                "--top",
                "2",
            ]
        )
        == 0
    )
    top = json.loads(capsys.readouterr().out)
    assert (
        len(top) == 2 and top[0]["answer"] in answer_list and top[0]["probability"] >= top[1]["probability"]
    )


def test_two_processes_share_the_vqa_evaluation_and_rank_0_writes_what_one_process_writes(vqa_data, tmp_path):
    import json

    from albef.config import ModelConfig
    from albef.eval.stages import evaluate_vqa_stage
    from albef.tokenizer import ALBEFTokenizer
    from albef.train.stages import export_model
    from tests.conftest import assert_halves_logged, call_under_torchrun, same_json_outputs, with_one_thread

    tokenizer = ALBEFTokenizer.from_pretrained(vqa_data / "tokenizer")
    torch.manual_seed(2)
    text = {
        "vocab_size": max(tokenizer.vocab_size, 300),
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "mask_token_id": tokenizer.mask_token_id,
    }
    cfg = ModelConfig.from_dict({"preset": "tiny", "text": {**text, "decoder_layers": 1}}, prefix="model")
    model_dir = export_model(build_model("vqa", cfg), tmp_path / "vqa", tokenizer, None, {"stage": "test"})
    # batches of one: every question is computed alike whichever rank and batch it falls in
    params = {"evaluate_vqa": {"data_dir": str(vqa_data), "k_test": 4, "batch_size": 1}}
    with_one_thread(lambda: evaluate_vqa_stage(params, model_dir, tmp_path / "one", progress=False))
    log = call_under_torchrun(
        "albef.eval.stages:evaluate_vqa_stage",
        {"params": params, "model_dir": model_dir, "out_dir": tmp_path / "two", "progress": False},
        tmp_path,
    )
    n = len(json.loads((vqa_data / "vqa_test.json").read_text()))
    assert_halves_logged(log, "questions", n)
    files = ("vqa_result.json", "top_answers.json", "metrics.json")
    assert same_json_outputs(tmp_path / "one", tmp_path / "two", files)["metrics.json"]["questions"] == n


@pytest.mark.parametrize(
    "answer, normalized",
    [
        ("Two", "2"),
        ("two.", "2"),
        ("none", "0"),
        ("a dog", "dog"),
        ("The red one", "red 1"),
        ("dont know", "don't know"),
        ("yes!", "yes"),
        ("black-and-white", "black and white"),
        ("black - white", "black white"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("  Tennis\tracket\n", "tennis racket"),
        ("(left)", "left"),
    ],
)
def test_answers_are_normalised_as_the_vqa_evaluation_server_does(answer, normalized):
    from albef.eval.vqa_answers import normalize_answer

    assert normalize_answer(answer) == normalized
    assert normalize_answer(normalized) == normalized  # idempotent: normalised human answers stay as they are


def test_vqa_accuracy_compares_normalised_answers():
    from albef.eval.vqa import vqa_accuracy

    assert vqa_accuracy("Two", ["2", "2", "two", "3"]) == 1.0  # three humans said "2", one way or another
    assert vqa_accuracy("a dog.", ["dog", "the dog"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("2", ["twenty"]) == 0.0  # only number words up to ten become digits
