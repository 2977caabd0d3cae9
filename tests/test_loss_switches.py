"""The loss switches of the paper's ablation (``LossSwitches``: params.yaml ``pretrain.itc``,
``pretrain.itm_hard_negatives``, ``pretrain.mod_itc``, ``pretrain.mod_mlm`` and each finetuning section's
``mod``): what each one computes, how bad combinations fail, and that the defaults change nothing."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
from conftest import make_batch

from albef.config import PRETRAIN_LOSS_KEYS, ConfigError, LossSwitches, read_params, tiny_config
from albef.models import ALBEFPretrain, ALBEFRetrieval
from albef.models.components import RandomChoices, negative_probabilities
from albef.models.pretrain import mlm_loss
from albef.models.ve import ALBEFVE
from albef.models.vqa import ALBEFVQA
from albef.train.classify import classifier_train_settings
from albef.train.stages import split_train_section
from albef.train.vqa import vqa_train_settings

REPO = Path(__file__).resolve().parents[1]
IDX = torch.tensor([0, 0, 1, 2])  # retrieval image ids: samples 0 and 1 show the same image


def _choices(seed: int = 0) -> RandomChoices:
    return RandomChoices(torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pretrain_model() -> ALBEFPretrain:
    torch.manual_seed(0)
    return ALBEFPretrain(tiny_config())


def _twins(model: torch.nn.Module, mode: str = "eval"):
    """Two identical copies (a forward updates the momentum encoders and queues) in eval mode: without dropout
    a teacher that is or is not run cannot change the online model's random draws."""
    one = copy.deepcopy(model)
    getattr(one, mode)()
    return one, copy.deepcopy(one)


def _terms(out) -> dict[str, torch.Tensor]:
    return out.loss_terms()


def _assert_same_terms(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), (k, a[k], b[k])


# ------------------------------------------------------------------------------------ defaults = today


# Loss terms of the code before the switches existed (tiny config, the seeds below, one thread), as hex floats.
# The exact bits were checked on the machine that wrote this file; elsewhere BLAS may round differently.
_BEFORE = {
    "pretrain": {
        "loss": "0x1.2fd4da0000000p+3",
        "loss_itc": "0x1.d472b80000000p+1",
        "loss_itm": "0x1.30fb960000000p+0",
        "loss_mlm": "0x1.2931720000000p+2",
    },
    "retrieval": {
        "loss": "0x1.509c920000000p+1",
        "loss_itc": "0x1.fc83de0000000p+0",
        "loss_itm": "0x1.496a8a0000000p-1",
    },
    "ve": {"loss": "0x1.387fc60000000p+0"},
}


def _before(name: str) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(float.fromhex(v)) for k, v in _BEFORE[name].items()}


def test_default_switches_reproduce_the_losses_of_the_code_before_them():
    cfg = tiny_config()
    images, ids, mask = make_batch(cfg, 4, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        pre = ALBEFPretrain(cfg)
        got = _terms(pre(images, ids, mask, alpha=0.4, choices=_choices()))
        torch.testing.assert_close(got, _before("pretrain"), rtol=1e-5, atol=1e-6)
        torch.manual_seed(0)
        ret = ALBEFRetrieval(cfg)
        got = _terms(ret(images, ids, mask, IDX, alpha=0.4, choices=_choices()))
        torch.testing.assert_close(got, _before("retrieval"), rtol=1e-5, atol=1e-6)
        torch.manual_seed(0)
        ve = ALBEFVE(cfg)
        with torch.no_grad():
            ve.cls_head[2].weight.add_(1.0)  # online != teacher: the distillation term counts
        got = _terms(ve(images, ids, mask, torch.tensor([0, 1, 2, 0]), alpha=0.4))
        torch.testing.assert_close(got, _before("ve"), rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_default_switches_are_the_full_forward_bit_for_bit(pretrain_model):
    """The forward with the default switches (given, set on the model, or none) against the pretraining
    forward assembled from its parts as it was before the switches: the same bits."""
    images, ids, mask = make_batch(pretrain_model.cfg, 4, 8)
    a, b = _twins(pretrain_model, "train")
    c = copy.deepcopy(a)
    c.use_losses(LossSwitches())
    torch.manual_seed(1)
    given = _terms(a(images, ids, mask, alpha=0.4, choices=_choices(), losses=LossSwitches()))
    torch.manual_seed(1)
    on_model = _terms(c(images, ids, mask, alpha=0.4, choices=_choices()))

    torch.manual_seed(1)
    m, choices = b, _choices()
    with torch.no_grad():
        m.temp.clamp_(m.cfg.quirks.temp_min, m.cfg.quirks.temp_max)
    image_embeds, image_feat = m.encode_image(images)
    text_embeds, text_feat = m.encode_text(ids, mask)
    with torch.no_grad():
        m.momentum_update()
        image_embeds_m, image_feat_m, text_feat_m = m.momentum_features(images, ids, mask)
        hard = torch.zeros(4, 4 + m.cfg.queue_size)
        hard.fill_diagonal_(1)
    itc = m.itc(image_feat, text_feat, image_feat_m, text_feat_m, hard, 0.4)
    m.dequeue_and_enqueue(image_feat_m, text_feat_m)
    itm = m.itm(
        image_embeds, text_embeds, mask, itc.sim_i2t, itc.sim_t2i, torch.eye(4, dtype=torch.bool), choices
    )
    mlm_ids, labels = choices.mlm_mask(ids, m.mask_spec())
    with torch.no_grad():
        teacher = m.text_encoder_m.mlm_logits(mlm_ids, mask, image_embeds_m)
    loss_mlm = mlm_loss(m.text_encoder.mlm_logits(mlm_ids, mask, image_embeds), labels, teacher, 0.4)
    before = {
        "loss": itc.loss + itm.loss + loss_mlm,
        "loss_itc": itc.loss,
        "loss_itm": itm.loss,
        "loss_mlm": loss_mlm,
    }
    _assert_same_terms(given, {k: v.detach() for k, v in before.items()})
    _assert_same_terms(on_model, given)


# ------------------------------------------------------------------------------------------ pretraining


def test_without_itc_there_is_no_itc_term_and_nothing_only_it_needs(pretrain_model):
    model = copy.deepcopy(pretrain_model).train()
    no_itc = LossSwitches(itc=False, itm_hard_negatives=False, mod_itc=False)
    model.use_losses(no_itc)
    images, ids, mask = make_batch(model.cfg, 4, 8)
    queue = model.image_queue.clone()
    out = model(images, ids, mask, alpha=0.4, choices=_choices())
    assert set(out.loss_terms()) == {"loss", "loss_itm", "loss_mlm"}
    assert torch.equal(out.loss, out.loss_itm + out.loss_mlm)
    assert out.loss_itc is None and out.sim_i2t is None and out.text_feat_m is None
    assert int(model.queue_ptr) == 0 and torch.equal(model.image_queue, queue)  # no queue update
    assert out.mlm_teacher_logits is not None  # MoD of MLM stays on
    # ITC's projections and temperature are frozen (DDP would wait for their gradients); all else learns
    out.loss.backward()
    frozen = {
        n for n, p in model.named_parameters() if not p.requires_grad and not n.split(".")[0].endswith("_m")
    }
    assert frozen == {"temp", "vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias"}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    model.use_losses(LossSwitches())
    assert model.temp.requires_grad and model.vision_proj.weight.requires_grad


class _Recorder(RandomChoices):
    """Random choices that keep the sampling weights they were given."""

    def __init__(self, seed: int = 0):
        super().__init__(torch.Generator().manual_seed(seed))
        self.weights: dict[str, torch.Tensor] = {}

    def negatives(self, weights, valid, which):
        self.weights[which] = weights.clone()
        return super().negatives(weights, valid, which)


@pytest.fixture(scope="module")
def reference(pretrain_model):
    """The full model's forward in eval mode at alpha 0.4 (with the ITM sampling weights) and at alpha 0."""
    batch = make_batch(pretrain_model.cfg, 4, 8)
    full, zero = _twins(pretrain_model)
    recorder = _Recorder()
    return {
        "batch": batch,
        "full": full(*batch, alpha=0.4, choices=recorder),
        "weights": recorder.weights,
        "zero": zero(*batch, alpha=0.0, choices=_Recorder()),
    }


def test_mod_off_gives_the_alpha_zero_losses_without_running_the_teacher(pretrain_model, reference):
    off, _ = _twins(pretrain_model)
    seen = []
    itc = off.itc

    def spy(*args, **kwargs):
        seen.append(itc(*args, **kwargs))
        return seen[-1]

    off.itc = spy
    switches = LossSwitches(mod_itc=False, mod_mlm=False)
    out_off = off(*reference["batch"], alpha=0.4, choices=_Recorder(), losses=switches)
    _assert_same_terms(out_off.loss_terms(), reference["zero"].loss_terms())
    assert seen[0].sim_i2t_m is None and seen[0].sim_t2i_m is None  # no teacher similarities
    assert torch.equal(seen[0].targets_i2t, out_off.itc_targets)  # the hard (one-hot) targets
    assert out_off.mlm_teacher_logits is None and reference["zero"].mlm_teacher_logits is not None


@pytest.mark.parametrize("switch", ["mod_itc", "mod_mlm"])
def test_each_mod_switch_turns_off_only_its_own_distillation(pretrain_model, reference, switch):
    off, _ = _twins(pretrain_model)
    out_off = off(*reference["batch"], alpha=0.4, choices=_Recorder(), losses=LossSwitches(**{switch: False}))
    full, zero = reference["full"].loss_terms(), reference["zero"].loss_terms()
    mine, other = ("loss_itc", "loss_mlm") if switch == "mod_itc" else ("loss_mlm", "loss_itc")
    assert torch.equal(out_off.loss_terms()[mine], zero[mine])
    assert torch.equal(out_off.loss_terms()[other], full[other])
    assert not torch.equal(full[mine], zero[mine])  # alpha matters for this term


def test_random_negatives_are_uniform_over_the_other_pairs_not_drawn_by_similarity(pretrain_model, reference):
    model, _ = _twins(pretrain_model)
    rand = _Recorder()
    model(*reference["batch"], choices=rand, losses=LossSwitches(itm_hard_negatives=False))
    eye = torch.eye(4, dtype=torch.bool)
    hard = reference["weights"]
    expected = negative_probabilities(reference["full"].sim_i2t[:, :4], eye)
    torch.testing.assert_close(hard["text_for_image"], expected)
    for which in ("image_for_text", "text_for_image"):
        assert torch.equal(rand.weights[which], (~eye).float())  # the same weight on every other pair
        assert not torch.equal(hard[which], rand.weights[which])


def test_random_negatives_never_pick_a_positive_and_reach_every_other_pair(pretrain_model):
    """The weights the ITM hands to the sampler with same-image positives (retrieval-style image ids), then
    many draws from them (a fixed generator): every other pair is drawn, about equally often, never a
    positive."""
    model = copy.deepcopy(pretrain_model).eval()
    images, ids, mask = make_batch(model.cfg, 4, 8)
    positive = IDX.view(-1, 1) == IDX.view(1, -1)
    recorder = _Recorder()
    with torch.no_grad():
        image_embeds, _ = model.encode_image(images)
        text_embeds, _ = model.encode_text(ids, mask)
        itm = model.itm(image_embeds, text_embeds, mask, None, None, positive, recorder)
    assert not positive[torch.arange(4), itm.neg_text_idx_for_image].any()
    weights = recorder.weights["text_for_image"]
    choices = _choices()
    counts = torch.zeros(4, 4)
    for _ in range(600):
        counts[torch.arange(4), choices.negatives(weights, ~positive, "text_for_image")] += 1
    assert counts[positive].sum() == 0
    expected = (600 / (~positive).sum(1, keepdim=True)).expand(4, 4)
    assert ((counts - expected).abs() < 0.2 * expected)[~positive].all()


# ------------------------------------------------------------------------------------------- finetuning


def test_retrieval_mod_off_is_alpha_zero_without_teacher_similarities():
    torch.manual_seed(0)
    base = ALBEFRetrieval(tiny_config())
    images, ids, mask = make_batch(base.cfg, 4, 8)
    off, zero = _twins(base)
    off.use_losses(LossSwitches(mod=False))
    seen = []
    itc = off.itc
    off.itc = lambda *a, **k: seen.append(itc(*a, **k)) or seen[-1]
    out_off = off(images, ids, mask, IDX, alpha=0.4, choices=_choices())
    out_zero = zero(images, ids, mask, IDX, alpha=0.0, choices=_choices())
    _assert_same_terms(out_off.loss_terms(), out_zero.loss_terms())
    assert seen[0].sim_i2t_m is None


def test_classifier_and_vqa_mod_off_is_alpha_zero_and_the_twins_still_follow():
    torch.manual_seed(0)
    cfg = tiny_config()
    ve = ALBEFVE(cfg)
    with torch.no_grad():
        ve.cls_head[2].weight.add_(1.0)
    images, ids, mask = make_batch(cfg, 4, 8)
    targets = torch.tensor([0, 1, 2, 0])
    off, zero = _twins(ve)
    off.use_losses(LossSwitches(mod=False))
    before = off.cls_head_m[2].weight.clone()
    out_off = off(images, ids, mask, targets, alpha=0.4)
    out_zero = zero(images, ids, mask, targets, alpha=0.0)
    assert torch.equal(out_off.loss, out_zero.loss)
    assert out_off.logits_m is None and out_zero.logits_m is not None
    torch.testing.assert_close(off.cls_head_m[2].weight, 0.995 * before + 0.005 * off.cls_head[2].weight)

    torch.manual_seed(0)
    vqa = ALBEFVQA(cfg)
    g = torch.Generator().manual_seed(0)
    answers = torch.randint(5, cfg.text.vocab_size, (5, 4), generator=g)
    answers[:, 0], answers[:, 3] = cfg.text.cls_token_id, cfg.text.pad_token_id
    answer_mask = (answers != cfg.text.pad_token_id).long()
    with torch.no_grad():
        for p in vqa.text_decoder.parameters():  # online != teacher
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    weights = torch.rand(5, generator=g)
    off, zero = _twins(vqa)
    args = (images, ids, mask, answers, answer_mask, [2, 1, 1, 1], weights)
    out_off = off(*args, alpha=0.4, losses=LossSwitches(mod=False))
    out_zero = zero(*args, alpha=0.0)
    assert torch.equal(out_off.loss, out_zero.loss)
    assert out_off.teacher_logits is None and out_zero.teacher_logits is not None


# ------------------------------------------------------------------------------------ params.yaml keys


def test_pretrain_switches_are_read_and_bad_combinations_name_the_keys():
    _, train = split_train_section({"itc": False, "itm_hard_negatives": False, "mod_itc": False}, "pretrain")
    assert train.losses == LossSwitches(itc=False, itm_hard_negatives=False, mod_itc=False)
    assert split_train_section({}, "pretrain")[1].losses == LossSwitches()
    with pytest.raises(
        ConfigError, match=r"pretrain\.itm_hard_negatives: true needs pretrain\.itc: true"
    ) as e:
        split_train_section({"itc": False, "mod_itc": False}, "pretrain")
    assert "pretrain.mod_itc" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        split_train_section({"itc": False}, "pretrain")
    assert all(
        key in str(e.value) for key in ("pretrain.itc", "pretrain.itm_hard_negatives", "pretrain.mod_itc")
    )
    with pytest.raises(ConfigError, match=r"pretrain\.mod_itc: true needs pretrain\.itc: true"):
        split_train_section({"itc": False, "itm_hard_negatives": False}, "pretrain")
    with pytest.raises(ConfigError, match=r"pretrain\.mod_mlm must be true or false, got 'no'"):
        split_train_section({"mod_mlm": "no"}, "pretrain")
    with pytest.raises(ConfigError, match=r"pretrain: unknown key\(s\) \['mod'\]"):
        split_train_section({"mod": False}, "pretrain")


def test_every_valid_pretrain_combination_keeps_a_loss_and_every_other_fails_at_load():
    valid = 0
    for values in itertools.product([True, False], repeat=len(PRETRAIN_LOSS_KEYS)):
        section = dict(zip(PRETRAIN_LOSS_KEYS, values, strict=True))
        itc, hard_negatives, mod_itc, _ = values
        if itc or not (hard_negatives or mod_itc):
            split_train_section(section, "pretrain")
            valid += 1
        else:
            with pytest.raises(ConfigError, match=r"needs pretrain\.itc: true"):
                split_train_section(section, "pretrain")
    assert valid == 10  # 8 with ITC, 2 without (MoD of MLM on or off); ITM and MLM are never switched off


def test_finetune_sections_take_mod_and_nothing_else():
    params = read_params(REPO / "params.yaml")
    for name in ("finetune_retrieval", "finetune_grounding"):
        assert split_train_section({**params[name], "mod": False}, name)[1].losses == LossSwitches(mod=False)
        with pytest.raises(ConfigError, match=rf"{name}: unknown key\(s\) \['itc'\]"):
            split_train_section({**params[name], "itc": False}, name)
    for task in ("ve", "nlvr"):
        section = {**params[f"finetune_{task}"], "mod": False}
        assert classifier_train_settings({f"finetune_{task}": section}, task)[1].losses == LossSwitches(
            mod=False
        )
    assert vqa_train_settings({"finetune_vqa": {"mod": False}})[1].losses.mod is False
    with pytest.raises(ConfigError, match=r"finetune_vqa\.mod must be true or false"):
        vqa_train_settings({"finetune_vqa": {"mod": 0}})
    with pytest.raises(ConfigError, match=r"pretrain_nlvr: unknown key\(s\) \['mod'\]"):
        classifier_train_settings({"pretrain_nlvr": {"mod": False}}, "nlvr_ta")


def test_params_yaml_defaults_are_the_full_model_and_go_to_mlflow():
    from albef.tracking.run import StageRun

    params = read_params(REPO / "params.yaml")
    assert split_train_section(params["pretrain"], "pretrain")[1].losses == LossSwitches()
    for name in ("finetune_retrieval", "finetune_grounding"):
        assert split_train_section(params[name], name)[1].losses == LossSwitches()
    for task in ("ve", "nlvr"):
        assert classifier_train_settings(params, task)[1].losses == LossSwitches()
    assert vqa_train_settings(params)[1].losses == LossSwitches()
    # a stage run logs every param of params.yaml (StageRun.log_params), the switches among them
    run = StageRun.__new__(StageRun)
    run.ref, recorded = "stage", []
    run._record = recorded.append
    run.log_params(params)
    logged = {k: v for op in recorded for k, v in op["params"].items()}
    for key in PRETRAIN_LOSS_KEYS:
        assert logged[f"pretrain.{key}"] == "True"
    for name in ("finetune_retrieval", "finetune_vqa", "finetune_ve", "finetune_nlvr", "finetune_grounding"):
        assert logged[f"{name}.mod"] == "True"
