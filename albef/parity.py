"""Check albef against numbers produced by the official ALBEF code (``albef_ref_<model>.pt`` files).

A reference file holds the official configuration (``meta``), weights in the official key layout
(``state_dict``), inputs, and sections of outputs (``outputs``, ``itc``, ``forward``, ...). For each file,
albef builds its own model from the configuration, loads the weights through :mod:`albef.checkpoint`,
recomputes every recorded output (replaying the recorded random choices) and compares.

A file whose model albef does not implement, or an entry albef does not know how to compute, is a failure,
never a skip: a reference that is not checked proves nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from albef.checkpoint import config_from_official, load_official
from albef.config import ModelConfig
from albef.models.base import ContrastiveModel, ContrastiveOutput
from albef.models.components import RecordedChoices, official_negative_weights, soft_cross_entropy
from albef.models.nlvr import ALBEFNLVR
from albef.models.pretrain import ALBEFPretrain
from albef.models.retrieval import ALBEFRetrieval
from albef.models.ve import ALBEFVE, DistilledClassifier
from albef.models.vqa import ALBEFVQA
from albef.models.xbert import Mode
from albef.safe_load import UnreadableCheckpoint, load_torch

TOLERANCE = 1e-5
# Sections that are given to the model rather than computed by it.
_INPUT_SECTIONS = {"meta", "state_dict", "inputs"}
_INPUT_ENTRIES = {
    "forward/seed",
    # the VQA training batch is given, not computed
    "train/answer_ids",
    "train/answer_mask",
    "train/k",
    "train/weights",
}


@dataclass
class EntryResult:
    name: str
    max_abs_error: float
    ok: bool
    note: str = ""


@dataclass
class ParityReport:
    path: Path
    model: str
    entries: list[EntryResult] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.entries) and all(e.ok for e in self.entries)

    def failures(self) -> list[str]:
        if self.error:
            return [self.error]
        return [
            f"{e.name}: max |diff| {e.max_abs_error:.3g}{' ' + e.note if e.note else ''}"
            for e in self.entries
            if not e.ok
        ]


def model_name(path: Path) -> str:
    m = re.fullmatch(r"albef_ref_(\w+)\.pt", path.name)
    if not m:
        raise ValueError(f"{path.name}: not a reference file (expected albef_ref_<model>.pt)")
    return m.group(1)


def reference_config(ref: dict[str, Any]) -> ModelConfig:
    meta = ref["meta"]
    config = json.loads(meta["config"])
    bert = json.loads(meta["bert_config"])
    vit = json.loads(meta["vit_config"]) if "vit_config" in meta else None
    cfg = config_from_official(config, bert, vit)
    ids = json.loads(meta.get("special_token_ids", "{}"))
    for key in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
        if key in ids:
            setattr(cfg.text, key, int(ids[key]))
    return cfg.validate()


def reference_alpha(ref: dict[str, Any]) -> float:
    """The distillation weight the official training loop passes its model's forward (its config's alpha)."""
    return float(json.loads(ref["meta"]["config"]).get("alpha", 0.0))


# ---------------------------------------------------------------------------- per-model computations


def _fresh(model_cls: type[Any], cfg: ModelConfig, ref: dict) -> Any:
    model = model_cls(cfg).eval()
    report = load_official(model, ref["state_dict"], strict=True)
    if report.missing or report.unexpected:
        raise AssertionError(f"reference weights did not load cleanly: {report.summary()}")
    return model


def _common_outputs(model: ContrastiveModel, ref: dict) -> dict[str, torch.Tensor]:
    inp = ref["inputs"]
    image, ids, mask = inp["image"], inp["input_ids"], inp["attention_mask"]
    image_embeds, image_feat = model.encode_image(image)
    text_embeds, text_feat = model.encode_text(ids, mask)
    fused = model.fuse(text_embeds, mask, image_embeds)
    n_img, n_txt = image.shape[0], ids.shape[0]
    img_idx = torch.arange(n_img).repeat_interleave(n_txt)
    txt_idx = torch.arange(n_txt).repeat(n_img)
    all_pairs = model.itm_logits(text_embeds[txt_idx], mask[txt_idx], image_embeds[img_idx]).view(
        n_img, n_txt, 2
    )
    sims = image_feat @ text_feat.t()
    return {
        "outputs/image_embeds": image_embeds,
        "outputs/image_feat": image_feat,
        "outputs/text_embeds": text_embeds,
        "outputs/text_feat": text_feat,
        "outputs/fusion_pos_last_hidden_state": fused,
        "outputs/itm_logits_pos": model.itm_head(fused[:, 0, :]),
        "outputs/itm_logits_all_pairs": all_pairs,
        "outputs/itm_score_i2t": all_pairs[..., 1],
        "outputs/sims_matrix": sims,
        "outputs/sim_i2t_batch": sims / model.temp,
        "outputs/sim_t2i_batch": text_feat @ image_feat.t() / model.temp,
        "outputs/temp": model.temp.detach(),
    }


def _itc_step(
    model: ContrastiveModel, ref: dict, hard: torch.Tensor, idx: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """One ITC step by its parts: momentum update, momentum features, distilled targets, loss, enqueue."""
    inp = ref["inputs"]
    image, ids, mask, alpha = inp["image"], inp["input_ids"], inp["attention_mask"], float(inp["alpha"])
    out = {
        "itc/image_queue_before": model.image_queue.clone(),
        "itc/text_queue_before": model.text_queue.clone(),
        "itc/queue_ptr_before": model.queue_ptr.clone(),
    }
    _, image_feat = model.encode_image(image)
    _, text_feat = model.encode_text(ids, mask)
    model.momentum_update()
    image_embeds_m, image_feat_m, text_feat_m = model.momentum_features(image, ids, mask)
    text_embeds_m = model.text_backbone_m(ids, mask, mode=Mode.TEXT)
    itc = model.itc(image_feat, text_feat, image_feat_m, text_feat_m, hard, alpha)
    bs = image.shape[0]
    out.update(
        {
            "itc/image_embeds_m": image_embeds_m,
            "itc/image_feat_m": image_feat_m,
            "itc/text_embeds_m": text_embeds_m,
            "itc/text_feat_m": text_feat_m,
            "itc/image_feat_all": torch.cat([image_feat_m.t(), out["itc/image_queue_before"]], dim=1),
            "itc/text_feat_all": torch.cat([text_feat_m.t(), out["itc/text_queue_before"]], dim=1),
            "itc/sim_targets": hard,
            "itc/sim_i2t_m": itc.sim_i2t_m,
            "itc/sim_t2i_m": itc.sim_t2i_m,
            "itc/sim_i2t_targets": itc.targets_i2t,
            "itc/sim_t2i_targets": itc.targets_t2i,
            "itc/sim_i2t": itc.sim_i2t,
            "itc/sim_t2i": itc.sim_t2i,
            "itc/loss_i2t": soft_cross_entropy(itc.sim_i2t, itc.targets_i2t),
            "itc/loss_t2i": soft_cross_entropy(itc.sim_t2i, itc.targets_t2i),
            "itc/loss_ita": itc.loss,
        }
    )
    positive = torch.eye(bs, dtype=torch.bool) if idx is None else idx.view(-1, 1) == idx.view(1, -1)
    out["itc/itm_weights_i2t"] = official_negative_weights(itc.sim_i2t[:, :bs], positive)
    out["itc/itm_weights_t2i"] = official_negative_weights(itc.sim_t2i[:, :bs], positive)
    # named_buffers adds the non-persistent ones (position_ids) that old transformers saved in state dicts.
    tensors = {**dict(model.named_buffers()), **model.state_dict()}
    momentum = {
        k: v.clone()
        for k, v in tensors.items()
        if k.startswith(("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m."))
    }
    model.dequeue_and_enqueue(image_feat_m, text_feat_m, idx)
    out["itc/image_queue_after"] = model.image_queue
    out["itc/text_queue_after"] = model.text_queue
    out["itc/queue_ptr_after"] = model.queue_ptr
    if idx is not None:
        out["itc/idx_queue_after"] = model.idx_queue
    for k, v in momentum.items():
        out[f"momentum_params_after_update/{k}"] = v
    return out


def _recorded(ref: dict) -> RecordedChoices:
    fwd = ref["forward"]
    return RecordedChoices(
        neg_image_idx_for_text=fwd.get("neg_image_idx_for_text"),
        neg_text_idx_for_image=fwd.get("neg_text_idx_for_image"),
        mlm_input_ids=fwd.get("mlm_input_ids"),
        mlm_labels=fwd.get("mlm_labels"),
    )


def _contrastive_forward(fwd: ContrastiveOutput) -> dict[str, torch.Tensor]:
    """The ``forward/*`` entries every ITC + ITM model records (official names: ``loss_ita``, ``vl_output``)."""
    return {
        "forward/loss_ita": fwd.loss_itc,
        "forward/loss_itm": fwd.loss_itm,
        "forward/neg_image_idx_for_text": fwd.neg_image_idx_for_text,
        "forward/neg_text_idx_for_image": fwd.neg_text_idx_for_image,
        "forward/vl_output": fwd.itm_logits,
        "forward/itm_labels": fwd.itm_labels,
    }


def compute_pretrain(ref: dict) -> dict[str, torch.Tensor]:
    cfg = reference_config(ref)
    inp = ref["inputs"]
    image, ids, mask, alpha = inp["image"], inp["input_ids"], inp["attention_mask"], float(inp["alpha"])
    out: dict[str, torch.Tensor] = {}

    model = _fresh(ALBEFPretrain, cfg, ref)
    out.update(_common_outputs(model, ref))
    image_embeds, _ = model.encode_image(image)
    out["outputs/multimodal_last_hidden_state"] = model.multimodal(ids, mask, image_embeds)
    out["outputs/mlm_logits"] = model.mlm_logits(ids, mask, image_embeds)

    bs = image.shape[0]
    hard = torch.zeros(bs, bs + cfg.queue_size)
    hard.fill_diagonal_(1)
    out.update(_itc_step(_fresh(ALBEFPretrain, cfg, ref), ref, hard, None))

    model = _fresh(ALBEFPretrain, cfg, ref)
    fwd = model(image, ids, mask, alpha=alpha, choices=_recorded(ref))
    out.update(_contrastive_forward(fwd))
    out.update(
        {
            "forward/loss_mlm": fwd.loss_mlm,
            "forward/mlm_input_ids": fwd.mlm_input_ids,
            "forward/mlm_labels": fwd.mlm_labels,
            "forward/mlm_logits": fwd.mlm_logits,
            "forward/mlm_logits_m": fwd.mlm_teacher_logits,
        }
    )
    return out


def compute_retrieval(ref: dict) -> dict[str, torch.Tensor]:
    cfg = reference_config(ref)
    inp = ref["inputs"]
    image, ids, mask, idx = inp["image"], inp["input_ids"], inp["attention_mask"], inp["idx"]
    alpha = float(inp["alpha"])
    out: dict[str, torch.Tensor] = {}

    model = _fresh(ALBEFRetrieval, cfg, ref)
    out.update(_common_outputs(model, ref))

    model = _fresh(ALBEFRetrieval, cfg, ref)
    idx_all = torch.cat([idx.view(1, -1), model.idx_queue], dim=1)
    same = (idx.view(-1, 1) == idx_all).float()
    out.update(_itc_step(model, ref, same / same.sum(1, keepdim=True), idx))

    model = _fresh(ALBEFRetrieval, cfg, ref)
    fwd = model(image, ids, mask, idx, alpha=alpha, choices=_recorded(ref))
    out.update(_contrastive_forward(fwd))
    return out


def vqa_reference_config(ref: dict) -> ModelConfig:
    """:func:`reference_config` plus the answer decoder's depth (``meta/decoder_config``)."""
    cfg = reference_config(ref)
    if "decoder_config" in ref["meta"]:
        dec = json.loads(ref["meta"]["decoder_config"])
        if int(dec.get("fusion_layer", 0)) != 0:
            raise ValueError("the VQA answer decoder cross-attends in every layer (fusion_layer 0)")
        cfg.text.decoder_layers = int(dec["num_hidden_layers"])
    return cfg.validate()


def compute_vqa(ref: dict) -> dict[str, torch.Tensor]:
    cfg = vqa_reference_config(ref)
    inp = ref["inputs"]
    image, q_ids, q_mask = inp["image"], inp["question_ids"], inp["question_mask"]
    a_ids, a_mask, k = inp["answer_list_ids"], inp["answer_list_mask"], int(inp["k"])
    out: dict[str, torch.Tensor] = {}

    model = _fresh(ALBEFVQA, cfg, ref)
    image_embeds, states = model.encode_question(image, q_ids, q_mask)
    rank = model.rank_answer(states, q_mask, a_ids, a_mask, k, keep_logits=True)
    topk_ids, topk_probs = model.predict(image, q_ids, q_mask, a_ids, a_mask, k)
    out.update(
        {
            "outputs/image_embeds": image_embeds,
            "outputs/question_states": states,
            "outputs/start_logits": rank.start_logits,
            "outputs/prob_first_token": rank.prob_first_token,
            "outputs/stage1_topk_probs": rank.stage1_probs,
            "outputs/stage1_topk_ids": rank.stage1_ids,
            "outputs/candidate_input_ids": rank.candidate_ids,
            "outputs/candidate_decoder_logits": rank.candidate_logits,
            "outputs/answer_loss": rank.answer_loss,
            "outputs/log_probs_sum": rank.log_probs_sum,
            "outputs/rerank_probs": rank.rerank_probs,
            "outputs/topk_ids": topk_ids,
            "outputs/topk_probs": topk_probs,
        }
    )

    if "train" in ref:
        train = ref["train"]
        model = _fresh(ALBEFVQA, cfg, ref)
        fwd = model(
            image,
            q_ids,
            q_mask,
            train["answer_ids"],
            train["answer_mask"],
            k=list(train["k"]),
            weights=train["weights"],
            alpha=reference_alpha(ref),
        )
        out["train/loss"] = fwd.loss
        out["train/answer_output_loss"] = fwd.answer_loss
        if fwd.teacher_logits is not None:
            out["train/logits_m"] = fwd.teacher_logits
    return out


def _classifier_entries(
    model_cls: type[DistilledClassifier], cfg: ModelConfig, ref: dict, images: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``outputs/*`` (eval forward) and ``train/*`` (one distillation step from the saved weights)."""
    inp = ref["inputs"]
    ids, mask, targets = inp["input_ids"], inp["attention_mask"], inp["targets"]
    model = _fresh(model_cls, cfg, ref)
    out = {
        "outputs/image_embeds": model.encode_image(images),
        "outputs/last_hidden_state": model.fused_states(images, ids, mask),
        "outputs/logits": model.logits(images, ids, mask),
    }
    model = _fresh(model_cls, cfg, ref)
    step = model(images, ids, mask, targets, alpha=reference_alpha(ref))
    out.update(
        {"train/loss": step.loss, "train/prediction": step.logits, "train/prediction_m": step.logits_m}
    )
    return out


def compute_ve(ref: dict) -> dict[str, torch.Tensor]:
    return _classifier_entries(ALBEFVE, reference_config(ref), ref, ref["inputs"]["image"])


# models/model_nlvr.py sets num_hidden_layers = 18 whatever its BERT config says, and its
# share_cross_attention pairs layers (6, 7), (8, 9), ..., (16, 17).
OFFICIAL_NLVR_LAYERS = 18
OFFICIAL_NLVR_FIRST_PAIR = 6


def nlvr_reference_config(ref: dict[str, Any]) -> ModelConfig:
    """The single-image config whose two-image model is the official NLVR2 model of ``ref``."""
    bert = json.loads(ref["meta"]["bert_config"])
    fusion_layer = int(bert.get("fusion_layer", 6))
    if fusion_layer != OFFICIAL_NLVR_FIRST_PAIR:
        raise ValueError(
            f"bert_config fusion_layer {fusion_layer}: the official NLVR2 model shares cross-attention from "
            f"layer {OFFICIAL_NLVR_FIRST_PAIR} on, so albef reproduces it only for fusion_layer "
            f"{OFFICIAL_NLVR_FIRST_PAIR}"
        )
    bert["num_hidden_layers"] = OFFICIAL_NLVR_LAYERS
    meta = dict(ref["meta"], bert_config=json.dumps(bert))
    cfg = reference_config({"meta": meta})
    cfg.text.fusion_layers //= 2  # the official 18 layers hold each of these fusion layers twice
    cfg.text.decoder_layers = cfg.text.fusion_layers  # no answer decoder; keep the default rule
    return cfg.validate()


def compute_nlvr(ref: dict) -> dict[str, torch.Tensor]:
    return _classifier_entries(ALBEFNLVR, nlvr_reference_config(ref), ref, ref["inputs"]["images"])


COMPUTE: dict[str, Callable[[dict], dict[str, torch.Tensor]]] = {
    "pretrain": compute_pretrain,
    "retrieval": compute_retrieval,
    "vqa": compute_vqa,
    "ve": compute_ve,
    "nlvr": compute_nlvr,
}


# ---------------------------------------------------------------------------- comparison


def _flatten(ref: dict) -> dict[str, Any]:
    flat = {}
    for section, content in ref.items():
        if section in _INPUT_SECTIONS:
            continue
        if isinstance(content, dict):
            for name, value in content.items():
                flat[f"{section}/{name}"] = value
        else:
            flat[section] = content
    return {k: v for k, v in flat.items() if k not in _INPUT_ENTRIES}


def check_reference(path: str | Path, tolerance: float = TOLERANCE) -> ParityReport:
    """Recompute every output recorded in one reference file and compare within ``tolerance``."""
    path = Path(path)
    name = model_name(path)
    report = ParityReport(path, name)
    if name not in COMPUTE:
        report.error = (
            f"{path.name}: albef has no '{name}' model yet (implemented: {sorted(COMPUTE)}); "
            "this reference cannot be checked"
        )
        return report
    try:
        ref = load_torch(path, "not a readable parity reference")  # weights_only=True: no pickled code runs
    except UnreadableCheckpoint as exc:
        report.error = str(exc)
        return report
    with torch.no_grad():
        ours = COMPUTE[name](ref)
    for key, expected in _flatten(ref).items():
        if key not in ours:
            report.entries.append(
                EntryResult(key, float("inf"), False, "(albef does not compute this entry)")
            )
            continue
        got = ours[key]
        if not isinstance(expected, torch.Tensor):
            expected = torch.tensor(expected)
        got = got.detach().to(expected.dtype) if isinstance(got, torch.Tensor) else torch.tensor(got)
        if got.shape != expected.shape:
            report.entries.append(
                EntryResult(
                    key, float("inf"), False, f"(shape {tuple(got.shape)} vs {tuple(expected.shape)})"
                )
            )
            continue
        err = (got.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
        report.entries.append(EntryResult(key, err, err <= tolerance))
    return report
