"""Small, separately testable pieces of ALBEF: momentum pairs, the feature queue, the contrastive loss,
hard-negative sampling and MLM masking, and the source of random choices."""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from albef.config import LossSwitches, ModelConfig

# ---------------------------------------------------------------------------- momentum encoders


def copy_to_momentum(pairs: Iterable[tuple[nn.Module, nn.Module]]) -> None:
    """Initialise each momentum twin from its online module and freeze it."""
    with torch.no_grad():
        for online, momentum in pairs:
            for p, p_m in zip(online.parameters(), momentum.parameters(), strict=True):
                p_m.copy_(p)
                p_m.requires_grad_(False)


@torch.no_grad()
def momentum_update(pairs: Iterable[tuple[nn.Module, nn.Module]], m: float) -> None:
    """EMA ``p_m <- m * p_m + (1 - m) * p`` over every parameter pair (buffers are not averaged).

    Uses the multi-tensor ``_foreach`` kernels: two launches per step instead of one per parameter, and no
    temporary copy of the online weights (``alpha`` scales them inside the add).
    """
    online: list[torch.Tensor] = []
    twins: list[torch.Tensor] = []
    for a, b in pairs:
        for p, p_m in zip(a.parameters(), b.parameters(), strict=True):
            online.append(p.detach())
            twins.append(p_m.data)
    torch._foreach_mul_(twins, m)
    torch._foreach_add_(twins, online, alpha=1.0 - m)


class MomentumTwins(abc.ABC):
    """A model whose online modules have momentum twins (EMA copies that give the distillation targets and, in
    the contrastive models, the queued features). The model names those modules in :attr:`twins`, each twin
    being the attribute of the same name with ``_m`` (the official keys), builds the twins when it distils and
    then calls :meth:`copy_params`; its forward calls :meth:`momentum_update` once per optimisation step, as
    the official forwards do. It also holds the loss switches a training forward applies (:meth:`use_losses`)."""

    cfg: Any  # the model's ModelConfig (momentum)
    #: the online modules with a momentum twin ``<name>_m``, in the official order
    twins: tuple[str, ...] = ()
    #: the loss switches a training forward applies when it is given none (set with :meth:`use_losses`)
    losses = LossSwitches()

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online module, its momentum twin)`` pairs; empty for a model built without its twins (one that
        does not distil)."""
        if all(getattr(self, f"{name}_m", None) is None for name in self.twins):
            return []
        return [(getattr(self, name), getattr(self, f"{name}_m")) for name in self.twins]

    def use_losses(self, losses: LossSwitches) -> None:
        """Train with ``losses`` (``mod``: distil from the momentum teacher)."""
        self.losses = losses

    def copy_params(self) -> None:
        """Reset every momentum twin to its online module (after loading new online weights) and freeze it."""
        copy_to_momentum(self.momentum_pairs())

    def momentum_update(self) -> None:
        """One EMA step of every twin towards its online module (one fused multi-tensor update)."""
        pairs = self.momentum_pairs()
        if pairs:
            momentum_update(pairs, self.cfg.momentum)


# ---------------------------------------------------------------------------- distributed gather


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (no gradient); identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


# ---------------------------------------------------------------------------- queue


@torch.no_grad()
def enqueue(queues: list[torch.Tensor], values: list[torch.Tensor], ptr: torch.Tensor) -> None:
    """Write ``values`` (each (N, ...)) as columns ``ptr .. ptr+N`` of ``queues`` (each (D, Q)) and advance.

    The queue is a ring buffer: ``Q`` must be a multiple of ``N`` (the global batch) so a write never wraps.
    """
    n = values[0].shape[0]
    size = queues[0].shape[1]
    if size % n:
        raise ValueError(
            f"queue size {size} is not divisible by the gathered batch {n}: choose queue_size as a multiple "
            "of per-device batch x world size"
        )
    # The write position stays on the device (no ``ptr.item()``): reading it would make the host wait for the
    # whole forward at every step on a GPU.
    columns = ptr + torch.arange(n, device=ptr.device)
    for queue, value in zip(queues, values, strict=True):
        queue.index_copy_(1, columns.to(queue.device), value.reshape(n, -1).T.to(queue.dtype))
    ptr.add_(n).remainder_(size)


# ---------------------------------------------------------------------------- losses


def distillation_mix(hard: torch.Tensor, soft: torch.Tensor, alpha: float) -> torch.Tensor:
    """Momentum distillation's one mixing rule, of targets (ITC) or of losses (MLM, VQA, SNLI-VE, NLVR2):
    ``(1 - alpha) * hard + alpha * soft``, ``soft`` coming from the momentum teacher."""
    return (1 - alpha) * hard + alpha * soft


def soft_cross_entropies(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-sum_j targets_j * log_softmax(logits)_j`` over the last axis: one value per row (token, pair)."""
    return -(F.log_softmax(logits, dim=-1) * targets).sum(dim=-1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean over rows of :func:`soft_cross_entropies`."""
    return soft_cross_entropies(logits, targets).mean()


def itc_targets(hard: torch.Tensor, teacher_logits: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * hard + alpha * softmax(teacher)``; plain hard targets without a teacher."""
    if teacher_logits is None:
        return hard
    return distillation_mix(hard, F.softmax(teacher_logits, dim=1), alpha)


# ---------------------------------------------------------------------------- random choices


class ChoiceSource(Protocol):
    """Where the model's random decisions come from. Replace it to replay recorded choices."""

    def negatives(self, weights: torch.Tensor, valid: torch.Tensor, which: str) -> torch.Tensor:
        """One column index per row of ``weights`` (B, B); -1 where a row has no valid candidate.
        ``which`` is ``"image_for_text"`` or ``"text_for_image"``."""
        ...

    def mlm_mask(self, input_ids: torch.Tensor, spec: MaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked input ids and labels (-100 where nothing is predicted)."""
        ...


@dataclass(frozen=True)
class MaskSpec:
    probability: float
    vocab_size: int
    mask_token_id: int
    never_mask: tuple[int, ...]  # pad, cls (and sep when sentences carry one)

    @classmethod
    def of(cls, model_cfg: ModelConfig, probability: float) -> MaskSpec:
        """MLM masking for ``model_cfg``'s text: never [PAD] or [CLS], nor [SEP] under
        ``quirks.single_sentence_sep``."""
        t = model_cfg.text
        never = (t.pad_token_id, t.cls_token_id)
        if model_cfg.quirks.single_sentence_sep:
            never = (*never, t.sep_token_id)
        return cls(probability, t.vocab_size, t.mask_token_id, never)


class RandomChoices:
    """Sample with ``generator`` (or torch's global RNG when None)."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def negatives(self, weights: torch.Tensor, valid: torch.Tensor, which: str) -> torch.Tensor:
        return sample_from_weights(weights, valid, self.generator)

    def mlm_mask(self, input_ids: torch.Tensor, spec: MaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return mask_tokens(input_ids, spec, self.generator)


@dataclass
class RecordedChoices:
    """Replays choices recorded from another run (e.g. the official code's ``torch.multinomial`` draws)."""

    neg_image_idx_for_text: torch.Tensor | None = None
    neg_text_idx_for_image: torch.Tensor | None = None
    mlm_input_ids: torch.Tensor | None = None
    mlm_labels: torch.Tensor | None = None

    def negatives(self, weights: torch.Tensor, valid: torch.Tensor, which: str) -> torch.Tensor:
        idx = self.neg_image_idx_for_text if which == "image_for_text" else self.neg_text_idx_for_image
        if idx is None:
            raise ValueError(f"RecordedChoices has no recorded negatives for {which}")
        idx = idx.to(weights.device)
        rows = torch.arange(len(idx), device=idx.device)
        if not bool(valid[rows, idx].all()):
            raise ValueError(f"recorded negatives {idx.tolist()} ({which}) include a positive pair")
        return idx

    def mlm_mask(self, input_ids: torch.Tensor, spec: MaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mlm_input_ids is None or self.mlm_labels is None:
            raise ValueError("RecordedChoices has no recorded MLM masks")
        return self.mlm_input_ids.to(input_ids.device), self.mlm_labels.to(input_ids.device)


# ---------------------------------------------------------------------------- hard negatives


def official_negative_weights(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """The official sampling weights: ``softmax(sim, dim=1)`` with positives zeroed (rows not renormalised).

    Kept for parity checks and inspection; sampling uses :func:`negative_probabilities`, which is the same
    distribution up to each row's normalisation but cannot underflow to an all-zero row.
    """
    return F.softmax(sim.float(), dim=1).masked_fill(positive, 0.0)


def negative_probabilities(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Row-normalised hard-negative probabilities: softmax over the non-positive columns only.

    Masking *before* the softmax keeps the mass on valid candidates even when the temperature is so low that
    the official "softmax then zero the diagonal" underflows to an all-zero row (official issues #18, #93).
    Rows with no valid candidate (batch of one, every other sample sharing the image id) are all zero.
    Non-finite similarities fall back to uniform over the valid candidates.
    """
    logits = sim.float().masked_fill(positive, float("-inf"))
    probs = torch.softmax(logits, dim=1)
    probs = torch.nan_to_num(probs, nan=0.0)
    # Computed for every row rather than behind ``if bad.any()``: the branch would read a GPU value on the host.
    bad = ~torch.isfinite(sim.float()).all(dim=1)
    uniform = (~positive).float()
    return torch.where(bad[:, None], uniform / uniform.sum(1, keepdim=True).clamp(min=1), probs)


def sample_from_weights(
    probs: torch.Tensor, valid: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one valid column per row (-1 for a row with no valid candidate). Never returns a positive."""
    probs = probs * valid
    has_candidate = probs.sum(dim=1) > 0
    # Every row draws (a row without candidates from a placeholder weight on column 0, then replaced by -1),
    # so neither the branch nor the row selection reads a GPU value on the host.
    placeholder = torch.zeros_like(probs[:1])
    placeholder[0, 0] = 1.0
    drawn = torch.multinomial(torch.where(has_candidate[:, None], probs, placeholder), 1, generator=generator)
    return torch.where(has_candidate, drawn.squeeze(1), -1)


# ---------------------------------------------------------------------------- MLM masking


def mask_tokens(
    input_ids: torch.Tensor, spec: MaskSpec, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking as the official ``ALBEF.mask``: each token is chosen with ``probability`` (never a
    special token in ``spec.never_mask``); of the chosen 80% become [MASK], half the rest a uniformly
    random id from the whole vocabulary, the rest stay. Returns (masked ids, labels with -100 elsewhere)."""
    ids, labels, device = input_ids, input_ids, input_ids.device

    def bernoulli(p: float) -> torch.Tensor:
        return torch.bernoulli(torch.full(ids.shape, p, device=device), generator=generator).bool()

    chosen = bernoulli(spec.probability)
    for special in spec.never_mask:
        chosen &= ids != special
    labels = labels.masked_fill(~chosen, -100)
    to_mask = bernoulli(0.8) & chosen
    ids = ids.masked_fill(to_mask, spec.mask_token_id)
    to_random = bernoulli(0.5) & chosen & ~to_mask
    random_ids = torch.randint(
        spec.vocab_size, ids.shape, dtype=ids.dtype, device=device, generator=generator
    )
    # torch.where, not ids[to_random] = random_ids[to_random]: a boolean index makes the host wait for the GPU.
    return torch.where(to_random, random_ids, ids), labels
