"""Each ALBEF mechanism alone: EMA, queue, losses, hard negatives, MLM masking, alpha ramp."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from albef.models.components import (
    MaskSpec,
    RandomChoices,
    RecordedChoices,
    copy_to_momentum,
    enqueue,
    itc_targets,
    mask_tokens,
    momentum_update,
    negative_probabilities,
    official_negative_weights,
    sample_from_weights,
    soft_cross_entropy,
)
from albef.schedule import alpha_ramp


def test_momentum_update_is_the_ema_formula():
    online, twin = nn.Linear(3, 2), nn.Linear(3, 2)
    copy_to_momentum([(online, twin)])
    assert all(not p.requires_grad for p in twin.parameters())
    torch.testing.assert_close(twin.weight, online.weight)
    with torch.no_grad():
        online.weight.add_(1.0)
    before = twin.weight.detach().clone()
    momentum_update([(online, twin)], 0.9)
    torch.testing.assert_close(twin.weight, 0.9 * before + 0.1 * online.weight.detach())
    # a second update keeps converging towards the online weights
    momentum_update([(online, twin)], 0.9)
    torch.testing.assert_close(twin.weight, 0.81 * before + 0.19 * online.weight.detach())


def test_queue_pointer_wraps_and_keeps_old_columns():
    q = torch.zeros(2, 6)
    ptr = torch.zeros(1, dtype=torch.long)
    for step in range(4):
        enqueue([q], [torch.full((2, 2), float(step + 1))], ptr)
    # 4 writes of 2 columns into 6: columns 0-1 hold the 4th write, 2-3 the 2nd, 4-5 the 3rd
    assert q[0].tolist() == [4, 4, 2, 2, 3, 3]
    assert int(ptr) == 2


def test_queue_rejects_a_batch_that_does_not_divide_it():
    with pytest.raises(ValueError, match="not divisible by the gathered batch 4"):
        enqueue([torch.zeros(2, 6)], [torch.zeros(4, 2)], torch.zeros(1, dtype=torch.long))


def test_soft_cross_entropy_on_hand_made_values():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [0.25, 0.75]
    hard = torch.tensor([[0.0, 1.0]])
    assert soft_cross_entropy(logits, hard).item() == pytest.approx(-math.log(0.75))
    soft = torch.tensor([[0.5, 0.5]])
    assert soft_cross_entropy(logits, soft).item() == pytest.approx(
        -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    )


def test_distilled_targets_mix_hard_and_teacher():
    hard = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0]])  # uniform
    torch.testing.assert_close(itc_targets(hard, teacher, 0.4), torch.tensor([[0.8, 0.2]]))
    assert itc_targets(hard, None, 0.4) is hard


def test_hard_negatives_never_sample_a_positive():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6, generator=g) * 5
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    positive = ids[:, None] == ids[None, :]
    probs = negative_probabilities(sim, positive)
    for _ in range(50):
        drawn = sample_from_weights(probs, ~positive, g)
        assert not positive[torch.arange(6), drawn].any()


def test_hard_negative_probabilities_are_the_official_distribution():
    sim = torch.randn(5, 5)
    eye = torch.eye(5, dtype=torch.bool)
    official = official_negative_weights(sim, eye)
    ours = negative_probabilities(sim, eye)
    torch.testing.assert_close(ours, official / official.sum(1, keepdim=True))


def test_low_temperature_underflow_does_not_crash():
    # temp at its 0.001 floor: logits of +-1000 make the official softmax put all mass on the diagonal,
    # and zeroing it leaves an all-zero row that torch.multinomial rejects (official issue #93).
    sim = torch.full((4, 4), -1000.0)
    sim.fill_diagonal_(1000.0)
    eye = torch.eye(4, dtype=torch.bool)
    assert official_negative_weights(sim, eye).sum() == 0
    drawn = sample_from_weights(negative_probabilities(sim, eye), ~eye)
    assert (drawn >= 0).all() and not eye[torch.arange(4), drawn].any()


def test_rows_without_any_negative_are_flagged_not_crashed():
    # batch of one, and a batch where every sample shares one image id (official issue #18)
    one = torch.ones(1, 1, dtype=torch.bool)
    assert sample_from_weights(negative_probabilities(torch.zeros(1, 1), one), ~one).tolist() == [-1]
    same = torch.ones(3, 3, dtype=torch.bool)
    assert sample_from_weights(negative_probabilities(torch.randn(3, 3), same), ~same).tolist() == [
        -1,
        -1,
        -1,
    ]


def test_non_finite_similarities_fall_back_to_uniform():
    sim = torch.tensor([[float("nan"), 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, float("inf"), 2.0]])
    eye = torch.eye(3, dtype=torch.bool)
    probs = negative_probabilities(sim, eye)
    torch.testing.assert_close(probs[0], torch.tensor([0.0, 0.5, 0.5]))
    assert torch.isfinite(probs).all()
    sample_from_weights(probs, ~eye)


def test_recorded_choices_are_replayed_and_checked():
    eye = torch.eye(3, dtype=torch.bool)
    rec = RecordedChoices(
        neg_image_idx_for_text=torch.tensor([1, 2, 0]), neg_text_idx_for_image=torch.tensor([0, 0, 0])
    )
    assert rec.negatives(torch.ones(3, 3), ~eye, "image_for_text").tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="include a positive"):
        rec.negatives(torch.ones(3, 3), ~eye, "text_for_image")


def test_mlm_masking_rates_and_specials():
    spec = MaskSpec(probability=0.15, vocab_size=1000, mask_token_id=3, never_mask=(0, 1))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (400, 50), generator=g)
    ids[:, 0] = 1
    ids[:, 40:] = 0
    masked, labels = mask_tokens(ids, spec, g)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 40:].any()  # never [CLS] or [PAD]
    rate = chosen[:, 1:40].float().mean().item()
    assert rate == pytest.approx(0.15, abs=0.01)
    to_mask = (masked == 3) & chosen
    unchanged = (masked == ids) & chosen
    assert to_mask.sum().item() / chosen.sum().item() == pytest.approx(0.8, abs=0.03)
    # random replacements (0.1) and unchanged tokens (0.1, plus random draws equal to the original)
    assert unchanged.sum().item() / chosen.sum().item() == pytest.approx(0.1, abs=0.03)
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_mlm_masking_is_reproducible_from_a_generator():
    spec = MaskSpec(0.5, 100, 3, (0, 1))
    ids = torch.randint(5, 100, (4, 10))
    a = RandomChoices(torch.Generator().manual_seed(7)).mlm_mask(ids, spec)
    b = RandomChoices(torch.Generator().manual_seed(7)).mlm_mask(ids, spec)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_alpha_ramp_matches_the_official_epoch_rule():
    steps = 100
    assert alpha_ramp(0, steps, 0.4) == 0.0
    assert alpha_ramp(50, steps, 0.4) == pytest.approx(0.2)
    assert alpha_ramp(100, steps, 0.4) == pytest.approx(0.4)
    assert alpha_ramp(350, steps, 0.4) == pytest.approx(0.4)
    assert alpha_ramp(100, steps, 0.4, ramp_epochs=2) == pytest.approx(0.2)
    assert alpha_ramp(5, steps, 0.4, ramp_epochs=0) == 0.4
    with pytest.raises(ValueError):
        alpha_ramp(0, 0, 0.4)


def test_mlm_loss_on_hand_made_values():
    from albef.models.pretrain import mlm_loss

    logits = torch.zeros(1, 3, 4)
    logits[0, 1] = torch.tensor([0.0, math.log(3.0), 0.0, 0.0])  # softmax [1/6, 1/2, 1/6, 1/6]
    labels = torch.tensor([[-100, 1, -100]])
    assert mlm_loss(logits, labels, None, 0.4).item() == pytest.approx(-math.log(0.5))
    teacher = torch.zeros(1, 3, 4)  # uniform teacher
    soft = -(math.log(1 / 6) * 3 + math.log(0.5)) / 4
    expected = 0.6 * -math.log(0.5) + 0.4 * soft
    assert mlm_loss(logits, labels, teacher, 0.4).item() == pytest.approx(expected)
    # nothing masked: zero, not NaN, and still differentiable
    logits.requires_grad_(True)
    zero = mlm_loss(logits, torch.full((1, 3), -100), teacher, 0.4)
    assert zero.item() == 0.0
    zero.backward()


def test_hard_negative_gathering_is_reproducible_across_processes():
    """An image or text drawn as the negative of many rows repeats in the gather index. Its gradient must be
    summed in a fixed order: x[idx]'s backward (index_put with accumulate) sums in a thread-dependent order
    on a multi-threaded CPU, and two runs of one seed drifted apart. The fixed-order sum equals PyTorch's
    deterministic mode, bit for bit."""
    from conftest import under_deterministic_algorithms

    from albef.config import tiny_config
    from albef.models.pretrain import ALBEFPretrain

    torch.manual_seed(0)
    model = ALBEFPretrain(tiny_config()).eval()  # no dropout: both passes see the same function
    bs, image_tokens = 256, 5  # tiny ViT: (32 / 16) ** 2 patches + [CLS]
    image = torch.randn(bs, image_tokens, 32)
    text = torch.randn(bs, 12, 32)
    mask = torch.ones(bs, 12, dtype=torch.long)
    positive = torch.eye(bs, dtype=torch.bool)
    # every text takes one of 3 images as its negative, every image one of 3 texts: many repeats
    choices = RecordedChoices(
        neg_image_idx_for_text=(torch.arange(bs) % 3 + 1) % bs,
        neg_text_idx_for_image=torch.arange(bs) % 3 + 4,
    )
    sim = torch.zeros(bs, bs)

    def grads() -> tuple[torch.Tensor, torch.Tensor]:
        img, txt = image.clone().requires_grad_(), text.clone().requires_grad_()
        model.itm(img, txt, mask, sim, sim, positive, choices).loss.backward()
        return img.grad, txt.grad

    fast, reference = grads(), under_deterministic_algorithms(grads)
    assert torch.equal(fast[0], reference[0]) and torch.equal(fast[1], reference[1])
