"""Batched, de-duplicated ITM re-ranking equals the official per-query algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_halves_logged, call_under_torchrun, make_batch, same_json_outputs, with_one_thread

from albef.config import tiny_config
from albef.eval.retrieval import candidate_pairs, recall_metrics, score_matrices, score_matrices_per_query
from albef.models import ALBEFRetrieval
from albef.models.retrieval import image_features, text_features


@pytest.mark.parametrize("k_test", [1, 3, 8])
def test_scores_and_rankings_equal_the_per_query_loop(k_test):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = ALBEFRetrieval(cfg).eval()
    images, _, _ = make_batch(cfg, 6, 8, seed=1)
    _, ids, mask = make_batch(cfg, 12, 8, seed=2)
    img_embeds, img_feats = image_features(model, images)
    txt_embeds, txt_feats = text_features(model, ids, mask)
    fast = score_matrices(model, img_embeds, img_feats, txt_embeds, txt_feats, mask, k_test, batch_size=5)
    slow = score_matrices_per_query(model, img_embeds, img_feats, txt_embeds, txt_feats, mask, k_test)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(fast[1:], slow[1:], strict=True):
        assert torch.equal(
            a.argsort(dim=1, descending=True, stable=True)[:, :k_test],
            b.argsort(dim=1, descending=True, stable=True)[:, :k_test],
        )


def test_each_pair_is_scored_once():
    sims = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    top_i2t, top_t2i, pairs = candidate_pairs(sims, 1)
    assert top_i2t.tolist() == [[0], [1]] and top_t2i.tolist() == [[0], [1], [0]]
    assert pairs.tolist() == [[0, 0], [0, 2], [1, 1]]  # (0,0) and (1,1) are in both lists, scored once


def test_recall_metrics_follow_the_official_definition():
    # 2 images, 4 texts: image 0 owns texts 0, 1; image 1 owns 2, 3
    score_i2t = np.array([[0.1, 0.9, 0.5, 0.2], [0.8, 0.1, 0.2, 0.3]])  # image 1's best own text is 3rd
    score_t2i = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.3, 0.7]])  # text 1 ranks its image 2nd
    m = recall_metrics(score_i2t, score_t2i, {0: [0, 1], 1: [2, 3]}, {0: 0, 1: 0, 2: 1, 3: 1})
    assert m["txt_r1"] == 50.0 and m["txt_r5"] == 100.0
    assert m["img_r1"] == 75.0 and m["img_r5"] == 100.0
    assert m["r_mean"] == pytest.approx(((50 + 100 + 100) / 3 + (75 + 100 + 100) / 3) / 2)


def test_whole_evaluation_on_a_dataset_equals_the_official_per_query_rankings(tiny_data):
    from conftest import TINY_MODEL

    from albef.config import ModelConfig
    from albef.data.datasets import RetrievalEvalDataset, image_source
    from albef.data.transforms import eval_transform
    from albef.eval.retrieval import evaluate_retrieval, rankings
    from albef.tokenizer import ALBEFTokenizer

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(TINY_MODEL)
    model = ALBEFRetrieval(cfg).eval()
    data = tiny_data / "data" / "processed"
    dataset = RetrievalEvalDataset(
        data / "retrieval_test.json", image_source(data), eval_transform(cfg.vision.image_size)
    )
    tokenizer = ALBEFTokenizer.from_pretrained(data / "tokenizer")
    result = evaluate_retrieval(
        model, dataset, tokenizer, k_test=5, max_tokens=16, image_batch=4, pair_batch=7
    )

    tokens = tokenizer(dataset.texts, max_length=16)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    img_embeds, img_feats = image_features(model, images)
    txt_embeds, txt_feats = text_features(model, tokens.input_ids, tokens.attention_mask)
    _, slow_i2t, slow_t2i = score_matrices_per_query(
        model, img_embeds, img_feats, txt_embeds, txt_feats, tokens.attention_mask, 5
    )
    torch.testing.assert_close(result.score_i2t, slow_i2t, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.score_t2i, slow_t2i, atol=1e-5, rtol=0)
    expected = recall_metrics(slow_i2t.numpy(), slow_t2i.numpy(), dataset.img2txt, dataset.txt2img)
    assert result.metrics == expected
    ranked = rankings(result, dataset, top=3)
    assert len(ranked["image_to_text"]) == len(dataset) and len(ranked["text_to_image"]) == len(dataset.texts)
    for t, query in enumerate(ranked["text_to_image"]):
        assert query["ground_truth"] == dataset.txt2img[t]
        assert query["top"][0][1] == pytest.approx(float(slow_t2i[t].max()), abs=1e-4)


def test_evaluate_test_file_points_the_section_at_another_split(tiny_data, tiny_retrieval_model, tmp_path):
    """``albef evaluate retrieval --test-file``: one ``evaluate`` section serves the in-domain test set and
    the shifted one (evaluate_zeroshot_shifted); params are not modified in place; a missing file is an error
    naming it."""
    import json

    import yaml

    from albef.cli import main
    from albef.stages import with_test_file

    data = str(tiny_data / "data" / "processed")
    params = {
        "evaluate": {"data_dir": data, "k_test": 4, "max_tokens": 16, "num_workers": 0, "examples": 0},
        "mlflow": {"enabled": False},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    model = str(tiny_retrieval_model)

    def run(*extra: str) -> tuple[int, dict]:
        out = tmp_path / f"out{len(extra)}"
        argv = [
            "evaluate",
            "retrieval",
            "--model",
            model,
            "--out",
            str(out),
            "--metrics",
            str(out / "m.json"),
        ]
        rc = main([*argv, "--params", str(path), "--quiet", *extra])
        return rc, json.loads((out / "m.json").read_text()) if rc == 0 else {}

    rc, default = run()
    assert rc == 0 and default["images"] == 6  # retrieval_test.json
    rc, other = run("--test-file", "retrieval_val.json")
    assert rc == 0 and other["images"] == 4 and other["texts"] == 20
    changed = with_test_file(params, "retrieval", "x.json")
    assert changed["evaluate"]["test_file"] == "x.json" and "test_file" not in params["evaluate"]
    assert with_test_file({"evaluate_grounding": {}}, "grounding", "a.json")["evaluate_grounding"] == {
        "test_files": ["a.json"]
    }
    assert run("--test-file", "nope.json")[0] == 2


def test_two_processes_share_the_retrieval_evaluation_and_rank_0_writes_what_one_process_writes(
    tiny_data, tiny_retrieval_model, tmp_path
):
    import json

    from albef.eval.stages import evaluate_retrieval_stage

    data = str(tiny_data / "data" / "processed")
    params = {"evaluate": {"data_dir": data, "k_test": 4, "image_batch": 1, "pair_batch": 1, "examples": 0}}
    with_one_thread(
        lambda: evaluate_retrieval_stage(params, tiny_retrieval_model, tmp_path / "one", progress=False)
    )
    log = call_under_torchrun(
        "albef.eval.stages:evaluate_retrieval_stage",
        {"params": params, "model_dir": tiny_retrieval_model, "out_dir": tmp_path / "two", "progress": False},
        tmp_path,
    )
    # 6 test images with 5 captions each; each rank encodes half and re-ranks half of the candidate pairs
    assert_halves_logged(log, "texts", 30)
    assert_halves_logged(log, "images", 6)
    assert "rank 1 of 2 evaluates candidate pairs" in log
    same_json_outputs(tmp_path / "one", tmp_path / "two", ["metrics.json"])
    one, two = (json.loads((tmp_path / d / "rankings.json").read_text()) for d in ("one", "two"))
    assert one["texts"] == two["texts"]
    for direction in ("image_to_text", "text_to_image"):
        for a, b in zip(one[direction], two[direction], strict=True):
            assert a["rank"] == b["rank"] and [c for c, _ in a["top"]] == [c for c, _ in b["top"]]
            np.testing.assert_allclose([s for _, s in a["top"]], [s for _, s in b["top"]], atol=2e-4)
