"""Behaviour of the pretraining and retrieval models on tiny configurations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch

from albef.config import tiny_config
from albef.models import ALBEFPretrain, ALBEFRetrieval
from albef.models.components import RandomChoices
from albef.models.retrieval import image_features, itm_scores, text_features
from albef.models.xbert import Mode


@pytest.fixture(scope="module")
def pretrain_model():
    torch.manual_seed(0)
    return ALBEFPretrain(tiny_config())


def test_pretrain_forward_returns_every_term(pretrain_model):
    cfg = pretrain_model.cfg
    images, ids, mask = make_batch(cfg, 4, 8)
    out = pretrain_model(
        images, ids, mask, alpha=0.4, choices=RandomChoices(torch.Generator().manual_seed(0))
    )
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.loss_itc + out.loss_itm + out.loss_mlm)
    assert out.sim_i2t.shape == (4, 4 + cfg.queue_size)
    assert out.itm_logits.shape == (12, 2) and out.itm_labels.tolist() == [1] * 4 + [0] * 8
    assert out.mlm_logits.shape == (4, 8, cfg.text.vocab_size)
    assert set(out.loss_terms()) == {"loss", "loss_itc", "loss_itm", "loss_mlm"}


def test_forward_writes_momentum_features_into_the_queue():
    torch.manual_seed(0)
    model = ALBEFPretrain(tiny_config())
    images, ids, mask = make_batch(model.cfg, 4, 8)
    out = model(images, ids, mask)
    torch.testing.assert_close(model.image_queue[:, :4], out.image_feat_m.T)
    torch.testing.assert_close(model.text_queue[:, :4], out.text_feat_m.T)
    assert int(model.queue_ptr) == 4


def test_gradients_reach_only_online_parameters():
    torch.manual_seed(0)
    model = ALBEFPretrain(tiny_config())
    images, ids, mask = make_batch(model.cfg, 4, 8)
    model(images, ids, mask, alpha=0.4).loss.backward()
    online, momentum = [], []
    for name, p in model.named_parameters():
        (momentum if name.split(".")[0].endswith("_m") else online).append((name, p))
    assert momentum and all(not p.requires_grad and p.grad is None for _, p in momentum)
    missing = [n for n, p in online if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert model.temp.grad is not None


def test_temperature_is_clamped_in_pretraining_only():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = ALBEFPretrain(cfg)
    images, ids, mask = make_batch(cfg, 4, 8)
    with torch.no_grad():
        model.temp.fill_(5.0)
    assert model(images, ids, mask).temp == pytest.approx(0.5)
    with torch.no_grad():
        model.temp.fill_(1e-6)
    assert model(images, ids, mask).temp == pytest.approx(0.001)
    retrieval = ALBEFRetrieval(cfg)
    with torch.no_grad():
        retrieval.temp.fill_(0.9)
    assert retrieval(images, ids, mask, torch.arange(4)).temp == pytest.approx(0.9)


def test_batch_of_one_and_shared_image_ids_do_not_crash():
    torch.manual_seed(0)
    cfg = tiny_config()
    images, ids, mask = make_batch(cfg, 1, 8)
    cfg1 = tiny_config()
    cfg1.queue_size = 31  # divisible by a batch of one
    out = ALBEFPretrain(cfg1)(images, ids, mask)
    assert torch.isfinite(out.loss) and out.itm_logits[out.itm_valid].shape == (1, 2)
    images, ids, mask = make_batch(cfg, 4, 8)
    retrieval = ALBEFRetrieval(cfg)
    out = retrieval(images, ids, mask, torch.tensor([7, 7, 7, 7]))
    assert torch.isfinite(out.loss)
    assert out.neg_image_idx_for_text.tolist() == [-1] * 4 and out.itm_logits[out.itm_valid].shape == (4, 2)
    # rows without a negative are left out of the loss: it is the cross-entropy of the positives alone
    valid = out.itm_valid
    torch.testing.assert_close(out.loss_itm, F.cross_entropy(out.itm_logits[valid], out.itm_labels[valid]))
    out = retrieval(images, ids, mask, torch.tensor([1, 1, 2, 2]))
    ids_ = torch.tensor([1, 1, 2, 2])
    assert (ids_[out.neg_image_idx_for_text] != ids_).all() and (
        ids_[out.neg_text_idx_for_image] != ids_
    ).all()


def test_retrieval_targets_make_same_image_captions_positive():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = ALBEFRetrieval(cfg)
    images, ids, mask = make_batch(cfg, 4, 8)
    out = model(images, ids, mask, torch.tensor([3, 5, 3, 9]))
    row0 = out.itc_targets[0, :4]
    torch.testing.assert_close(row0, torch.tensor([0.5, 0.0, 0.5, 0.0]))
    assert model.idx_queue[0, :4].tolist() == [3, 5, 3, 9]
    # the second step sees the first step's ids in the queue as positives too
    out = model(images, ids, mask, torch.tensor([3, 5, 3, 9]))
    assert out.itc_targets[0].sum().item() == pytest.approx(1.0)
    assert (out.itc_targets[0] > 0).sum().item() == 4


@pytest.mark.parametrize(
    ("images", "ids", "mask", "idx", "message"),
    [
        (
            (4, 3, 16, 16),
            (4, 8),
            (4, 8),
            None,
            r"images: expected .*\(batch, 3, 32, 32\), got \(4, 3, 16, 16\)",
        ),
        ((4, 1, 32, 32), (4, 8), (4, 8), None, r"images: expected .* got \(4, 1, 32, 32\)"),
        ((4, 3, 32, 32), (3, 8), (3, 8), None, "batch mismatch: 4 images but 3 texts"),
        ((4, 3, 32, 32), (4, 8), (4, 7), None, "attention_mask: expected the shape of input_ids"),
        ((4, 3, 32, 32), (4, 40), (4, 40), None, "exceeds text.max_positions"),
        ((4, 3, 32, 32), (4, 8), (4, 8), 3, "idx: expected one image id per sample"),
    ],
)
def test_bad_shapes_say_what_was_expected(images, ids, mask, idx, message):
    cfg = tiny_config()
    model = ALBEFRetrieval(cfg)
    with pytest.raises(ValueError, match=message):
        model(
            torch.randn(*images),
            torch.ones(*ids, dtype=torch.long),
            torch.ones(*mask, dtype=torch.long),
            torch.arange(idx if idx is not None else images[0]),
        )


def test_token_ids_out_of_range_are_rejected(pretrain_model):
    images, ids, mask = make_batch(pretrain_model.cfg, 2, 8)
    ids[0, 3] = pretrain_model.cfg.text.vocab_size
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 100\), got range \[.*, 100\]"):
        pretrain_model(images, ids, mask)


def test_fused_attention_equals_explicit_softmax_attention(pretrain_model):
    """SDPA (the fast path) and the explicit path Grad-CAM needs compute the same function."""
    model = pretrain_model.eval()
    images, ids, mask = make_batch(model.cfg, 3, 8)
    image_embeds, _ = model.encode_image(images)
    fast = model.multimodal(ids, mask, image_embeds)
    blocks = [m for m in model.text_backbone.modules() if hasattr(m, "save_attention")]
    for block in blocks:
        block.save_attention = True
    try:
        slow = model.multimodal(ids, mask, image_embeds)
    finally:
        for block in blocks:
            block.save_attention = False
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    model.train()


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = tiny_config()
    cfg.text.dropout = 0.0
    images, ids, mask = make_batch(cfg, 4, 8)
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = ALBEFRetrieval(cfg)
        model.set_grad_checkpointing(enable)
        out = model(
            images, ids, mask, torch.arange(4), choices=RandomChoices(torch.Generator().manual_seed(1))
        )
        out.loss.backward()
        grads.append(model.visual_encoder.blocks[0].attn.qkv.weight.grad.clone())
        grads.append(model.text_encoder.encoder.layer[0].attention.self.query.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[2])
    torch.testing.assert_close(grads[1], grads[3])


def test_text_modes_compose(pretrain_model):
    model = pretrain_model.eval()
    images, ids, mask = make_batch(model.cfg, 2, 8)
    image_embeds, _ = model.encode_image(images)
    text = model.text_backbone(ids, mask, mode=Mode.TEXT)
    fused = model.text_backbone(
        attention_mask=mask, image_embeds=image_embeds, mode="fusion", text_embeds=text
    )
    torch.testing.assert_close(fused, model.multimodal(ids, mask, image_embeds))
    with pytest.raises(ValueError, match="needs image_embeds"):
        model.text_backbone(ids, mask, mode="multimodal")
    model.train()


def test_scoring_functions_match_the_model():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = ALBEFRetrieval(cfg).eval()
    images, ids, mask = make_batch(cfg, 5, 8)
    img_embeds, img_feat = image_features(model, images, batch_size=2)
    txt_embeds, _ = text_features(model, ids, mask, batch_size=3)
    torch.testing.assert_close(img_feat, model.encode_image(images)[1])
    pairs = torch.tensor([[0, 1], [4, 4], [2, 0]])
    scores = itm_scores(model, img_embeds, txt_embeds, mask, pairs, batch_size=2)
    torch.testing.assert_close(
        itm_scores(model, img_embeds, txt_embeds, mask, pairs, batch_size=1, image_chunk=1), scores
    )
    for (i, t), score in zip(pairs.tolist(), scores, strict=True):
        expected = model.itm_logits(txt_embeds[t : t + 1], mask[t : t + 1], img_embeds[i : i + 1])[0, 1]
        torch.testing.assert_close(score, expected)
    with pytest.raises(ValueError, match=r"pairs: expected shape \(P, 2\)"):
        itm_scores(model, img_embeds, txt_embeds, mask, torch.tensor([1, 2, 3]))


def test_a_tiny_model_overfits_eight_pairs():
    """ITC and ITM drive 8 random image-text pairs to perfect scores within a bounded number of steps.

    ITC: every image retrieves its caption and every caption its image. ITM: every positive pair and the
    hardest (ITC-nearest) negative of every image and every caption are classified correctly, which is the
    distribution ITM trains on (contrastive hard negatives).
    """
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.queue_size, cfg.momentum, cfg.text.dropout = 8, 0.5, 0.0
    model = ALBEFRetrieval(cfg)
    images, ids, mask = make_batch(cfg, 8, 8, seed=1)
    idx = torch.arange(8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    choices = RandomChoices(torch.Generator().manual_seed(0))

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            img_embeds, img_feat = model.encode_image(images)
            txt_embeds, txt_feat = model.encode_text(ids, mask)
            sims = img_feat @ txt_feat.T
            itc_acc = ((sims.argmax(1) == idx).float().mean() + (sims.argmax(0) == idx).float().mean()) / 2
            off = sims.masked_fill(torch.eye(8, dtype=torch.bool), -2)
            ii = torch.cat(
                [idx, idx, off.argmax(0)]
            )  # positives, hardest text per image, hardest image per text
            tt = torch.cat([idx, off.argmax(1), idx])
            pred = model.itm_logits(txt_embeds[tt], mask[tt], img_embeds[ii]).argmax(1)
            itm_acc = (pred == (ii == tt).long()).float().mean()
        model.train()
        return float(itc_acc), float(itm_acc)

    assert evaluate() != (1.0, 1.0)
    for step in range(1, 401):
        out = model(images, ids, mask, idx, alpha=0.4, choices=choices)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % 10 == 0 and evaluate() == (1.0, 1.0):
            break
    assert evaluate() == (1.0, 1.0), f"not overfitted after {step} steps: {evaluate()} {out.loss_terms()}"


def test_projected_image_keys_and_values_give_the_same_fusion():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = ALBEFRetrieval(cfg).eval()
    images, ids, mask = make_batch(cfg, 3, 8)
    img_embeds, _ = model.encode_image(images)
    txt_embeds, _ = model.encode_text(ids, mask)
    projected = model.text_backbone.project_image(img_embeds)
    assert len(projected.layers) == cfg.text.fusion_layers
    which = torch.tensor([2, 0, 1])
    torch.testing.assert_close(
        model.fuse(txt_embeds, mask, projected.select(which)), model.fuse(txt_embeds, mask, img_embeds[which])
    )


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_a_training_forward_and_backward_never_wait_for_the_device(task):
    """On the meta device every tensor has a shape and no value, so anything that reads a value on the host
    (``.item()``, ``bool(t)``, a boolean index, ``.tolist()``) raises: the forward and backward of a training
    step are free of the host synchronisations that stall a GPU at every step."""
    cfg = tiny_config()
    model = (ALBEFPretrain if task == "pretrain" else ALBEFRetrieval)(cfg).to("meta").train()
    images, ids, mask = (t.to("meta") for t in make_batch(cfg, 4, 8))
    extra = () if task == "pretrain" else (torch.arange(4, device="meta"),)
    out = model(images, ids, mask, *extra, alpha=0.4, choices=RandomChoices())
    out.loss.backward()
    assert out.loss.device.type == "meta" and set(out.loss_terms()) >= {"loss", "loss_itc", "loss_itm"}
