"""The one training loop every albef task uses.

What it does, in the official order: for each optimisation step it sets the learning rate from the
official schedule (:class:`albef.schedule.LRSchedule`, in steps) and the distillation weight from the alpha
ramp, runs ``grad_accum`` micro-batches (forward under autocast on GPU, fp32 on CPU; backward; DDP's
gradient all-reduce only on the last one), checks that the loss is finite on every rank, and steps AdamW
with the official parameter groups. The ALBEF forward itself updates the momentum encoders and the queues,
once per micro-batch, as in the official code.

What it guarantees:

* **Resume, bit for bit.** Checkpoints (every ``checkpoint_every`` steps and at every epoch end, atomic,
  last ``keep_checkpoints`` kept) hold the model with momentum encoders and queues, the optimizer, the
  scaler, the data position and every RNG of every rank. The data order and each sample's augmentation
  are functions of ``(seed, epoch, index)`` (:mod:`albef.train.sampler`), so a run killed at any moment
  and resumed with ``resume: auto`` reaches the same weights as an uninterrupted one (exactly, on CPU).
* **Only matching checkpoints resume.** A checkpoint folder carries the fingerprint of the run that wrote
  it (training settings, model config, data, initial weights, albef's code). After a change it is moved aside to
  ``checkpoints.previous`` and training starts afresh, instead of silently continuing another run.
* **Stops loudly.** A non-finite loss stops the run with the step, the epoch, the batch and every loss
  term, keeping the last good checkpoint; a failed checkpoint write (disk full) leaves the previous one.
* **One writer.** Only rank 0 writes checkpoints, logs and exports; every rank computes.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from albef.config import ConfigError
from albef.io import atomic_write_text
from albef.models.components import RandomChoices
from albef.schedule import LRSchedule, alpha_ramp, set_lr
from albef.train.checkpointing import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from albef.train.distributed import WorldInfo
from albef.train.optim import build_optimizer
from albef.train.sampler import EpochSampler, SeededSamples, preserved_rng

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Settings of one training run (a ``pretrain:`` or ``finetune_*:`` section of ``params.yaml``)."""

    epochs: int = 1
    batch_size: int = 32  # per process; the global batch is batch_size x processes (x grad_accum per step)
    grad_accum: int = 1  # micro-batches per optimisation step
    lr: float = 1e-4
    weight_decay: float = 0.02
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_epochs: int = 1  # warm-up stairs of `warmup_stair` steps within epoch 0 (the official scheme)
    warmup_stair: int = 100
    alpha: float = 0.4  # distillation weight, ramped up over `alpha_ramp_epochs`
    alpha_ramp_epochs: float = 1.0
    grad_clip: float | None = None  # max global grad norm; the official code does not clip
    seed: int = 42
    precision: str = (
        "auto"  # auto (bf16 on GPUs that have it, else fp16 + scaler; fp32 on CPU) | fp32 | bf16 | fp16
    )
    grad_checkpointing: bool = False
    num_workers: int = 2
    checkpoint_every: int = 0  # steps between checkpoints (0: at epoch ends only)
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto: newest matching checkpoint | never | path to a checkpoint file
    log_every: int = 10  # steps between log rows
    validate_every: int = 1  # epochs between validations (0: never)
    select_metric: str | None = None  # export the weights with the best value of this validation metric
    max_steps: int = 0  # stop after this many steps (0: all epochs), for smoke runs

    def __post_init__(self) -> None:
        problems = []
        for name in ("epochs", "batch_size", "grad_accum", "warmup_stair", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("warmup_epochs", "num_workers", "checkpoint_every", "keep_checkpoints", "max_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.lr <= 0:
            problems.append(f"lr must be positive (got {self.lr})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS} (got {self.precision!r})")
        if problems:
            raise ConfigError("training settings: " + "; ".join(problems))

    def fingerprint_fields(self) -> dict[str, Any]:
        """The settings that change the numbers a run produces (not logging, workers or checkpointing)."""
        ignore = {"num_workers", "checkpoint_every", "keep_checkpoints", "resume", "log_every", "max_steps"}
        return {k: v for k, v in asdict(self).items() if k not in ignore}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and every loss term."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


class Step(Protocol):
    """What a task's forward returns: ``loss`` with its graph, and ``loss_terms()`` as floats."""

    loss: torch.Tensor

    def loss_terms(self) -> dict[str, float]: ...


ForwardFn = Callable[[nn.Module, dict[str, torch.Tensor], float, RandomChoices], Step]
ValidateFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class FitResult:
    step: int
    epochs_completed: int
    resumed_from: str | None
    seconds: float
    samples_per_second: float
    last_log: dict[str, float] = field(default_factory=dict)
    validations: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (settings, configs, file digests)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@functools.cache
def code_digest() -> str:
    """sha256 of albef's own source files. Part of every run's fingerprint: DVC re-runs a training stage when
    its code changes, and without this the stage would resume the old run's final checkpoint and export
    the old weights."""
    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def file_digest(path: str | Path, limit: int = 64 << 20) -> str:
    """sha256 of a file (its first ``limit`` bytes plus its size, so multi-GB weights hash quickly)."""
    path = Path(path)
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(limit))
    return h.hexdigest()[:16]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None``: fp32, no autocast)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ConfigError(f"precision {precision!r} needs a GPU; this run is on {device.type} (use fp32)")
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


class HistoryLog:
    """A CSV of rows keyed by ``step`` that survives resumes: rows past the resumed step are dropped.

    The file is read once; afterwards the rows live in memory and each append rewrites the file atomically.
    """

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self._rows: list[dict[str, Any]] | None = None

    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = []
            if self.path.is_file():
                with open(self.path, newline="") as fh:
                    self._rows = list(csv.DictReader(fh))
        return self._rows

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        self._rows = [r for r in self.rows() if int(float(r["step"])) <= step]
        self._write()

    def append(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.rows().append({k: _fmt(v) for k, v in row.items()})
        self._write()

    def _write(self) -> None:
        rows = self.rows()
        columns: list[str] = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        lines = [",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, "\n".join(lines) + "\n")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class Trainer:
    """Runs :meth:`fit` for one model, dataset and forward function under a :class:`TrainConfig`."""

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        collate: Callable[[list], dict[str, torch.Tensor]],
        forward: ForwardFn,
        cfg: TrainConfig,
        run_dir: str | Path,
        world: WorldInfo,
        device: torch.device,
        run_fingerprint: str,
        validate: ValidateFn | None = None,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        progress: bool = True,
        name: str = "train",
    ):
        self.model, self.dataset, self.collate, self.forward = model, dataset, collate, forward
        self.cfg, self.world, self.device = cfg, world, device
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.run_fingerprint = fingerprint(run_fingerprint, code_digest())
        self.validate, self.on_log = validate, on_log
        self.progress, self.name = progress, name
        self.history = HistoryLog(self.run_dir / "history.csv", world.is_main)
        self.val_history = HistoryLog(self.run_dir / "validation.csv", world.is_main)

        self.sampler = EpochSampler(
            len(dataset),  # type: ignore[arg-type]
            cfg.batch_size,
            world.rank,
            world.world_size,
            seed=cfg.seed,
            shuffle=True,
            drop_last=True,
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch // cfg.grad_accum
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"{name}: one epoch gives {self.sampler.batches_per_epoch} batches per process, fewer than "
                f"grad_accum={cfg.grad_accum}; lower grad_accum or batch_size"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.schedule = LRSchedule(
            lr=cfg.lr,
            epochs=cfg.epochs,
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
            warmup_epochs=cfg.warmup_epochs,
            step_size=cfg.warmup_stair,
        )
        self.amp_dtype = resolve_precision(cfg.precision, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        model.to(device)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)  # type: ignore[operator]
        self.optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
        self.choices_gen = torch.Generator(device=device)
        self.choices = RandomChoices(self.choices_gen)
        self.ddp: nn.Module = model
        if world.distributed:
            # Queues are filled from every rank's features, so they agree without broadcasting buffers.
            self.ddp = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of the current epoch already consumed
        self.best: dict[str, float] | None = None
        self.resumed_from: str | None = None

    # ------------------------------------------------------------------------------------------- resume
    def _check_fingerprint(self) -> None:
        """Move aside checkpoints written by a different run, so `resume: auto` never mixes two runs."""
        marker = self.ckpt_dir / "fingerprint.json"
        if self.world.is_main and self.ckpt_dir.is_dir():
            old = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
            if old != self.run_fingerprint and any(self.ckpt_dir.iterdir()):
                previous = self.run_dir / "checkpoints.previous"
                shutil.rmtree(previous, ignore_errors=True)
                self.ckpt_dir.rename(previous)
                log.warning(
                    "%s: checkpoints in %s belong to another run (settings, data, initial weights or code changed); "
                    "moved to %s, starting afresh",
                    self.name,
                    self.ckpt_dir,
                    previous,
                )
        if self.world.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, json.dumps({"fingerprint": self.run_fingerprint}) + "\n")
        self._barrier()

    def _resume_source(self) -> Path | None:
        resume = self.cfg.resume
        if resume == "never":
            return None
        if resume == "auto":
            return latest_checkpoint(self.ckpt_dir)
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"{self.name}: resume checkpoint not found: {path}")
        return path

    def _seed_fresh(self) -> None:
        # Per-rank streams (dropout, hard negatives, masking), as the official `seed + rank`.
        seed = self.cfg.seed + self.world.rank
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2**32))
        self.choices_gen.manual_seed(self.cfg.seed * 1000 + self.world.rank)

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path, self.model, self.optimizer, self.scaler, restore_rng=False)
        extra = state["extra"]
        if extra.get("fingerprint") not in (None, self.run_fingerprint):
            raise ConfigError(
                f"{path} was written by a different run (fingerprint {extra.get('fingerprint')})"
            )
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.batch_in_epoch = int(extra.get("batch_in_epoch", 0))
        self.best = extra.get("best")
        ranks = extra.get("ranks", [])
        saved_world = int(extra.get("world_size", 1))
        if saved_world == self.world.world_size and len(ranks) == saved_world:
            mine = ranks[self.world.rank]
            set_rng_state(mine["rng"])
            self.choices_gen.set_state(mine["choices"].to(self.choices_gen.get_state().device))
        else:
            log.warning(
                "%s: %s was written by %d processes, this run has %d: continuing with fresh random streams and "
                "the data position rescaled (not bit-identical to an uninterrupted run)",
                self.name,
                path,
                saved_world,
                self.world.world_size,
            )
            self._seed_fresh()
            samples = self.batch_in_epoch * saved_world * self.cfg.batch_size
            self.batch_in_epoch = samples // (self.world.world_size * self.cfg.batch_size)
            self.batch_in_epoch -= self.batch_in_epoch % self.cfg.grad_accum
        self.resumed_from = str(path)
        self.history.truncate_after(self.step)
        self.val_history.truncate_after(self.step)
        if self.world.is_main:
            log.info(
                "%s: resumed from %s (step %d, epoch %d, batch %d)",
                self.name,
                path,
                self.step,
                self.epoch,
                self.batch_in_epoch,
            )

    # --------------------------------------------------------------------------------------- checkpoints
    def _gather_rank_states(self) -> list[dict[str, Any]]:
        mine = {"rng": rng_state(), "choices": self.choices_gen.get_state().cpu()}
        if not self.world.distributed:
            return [mine]
        gathered: list[Any] = [None] * self.world.world_size
        dist.all_gather_object(gathered, mine)
        return gathered

    def save(self) -> Path | None:
        ranks = self._gather_rank_states()
        path = None
        if self.world.is_main:
            extra = {
                "fingerprint": self.run_fingerprint,
                "batch_in_epoch": self.batch_in_epoch,
                "world_size": self.world.world_size,
                "ranks": ranks,
                "best": self.best,
            }
            try:
                path = save_checkpoint(
                    self.ckpt_dir,
                    self.step,
                    self.model,
                    self.optimizer,
                    self.scaler,
                    epoch=self.epoch,
                    extra=extra,
                    keep=self.cfg.keep_checkpoints,
                )
            except OSError as exc:
                previous = latest_checkpoint(self.ckpt_dir)
                raise CheckpointWriteError(
                    f"{self.name}: could not write the checkpoint of step {self.step} in {self.ckpt_dir} "
                    f"({exc.strerror or exc}); the previous checkpoint is intact: {previous}"
                ) from exc
        self._barrier()
        return path

    def _barrier(self) -> None:
        if self.world.distributed and dist.is_initialized():
            dist.barrier()

    # ------------------------------------------------------------------------------------------- training
    def _loader(self) -> DataLoader:
        return DataLoader(
            SeededSamples(self.dataset, self.cfg.seed),
            batch_size=self.cfg.batch_size,
            sampler=self.sampler,
            num_workers=self.cfg.num_workers,
            collate_fn=self.collate,
            pin_memory=self.device.type == "cuda",
            # Its own generator, so creating the iterator never draws from the global stream.
            generator=torch.Generator(),
            persistent_workers=False,
        )

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _run_validation(self) -> dict[str, float] | None:
        if self.validate is None:
            return None
        self.model.eval()
        with preserved_rng(cuda=True), torch.no_grad():
            metrics = self.validate(self.model)
        self.model.train()
        row = {"step": self.step, "epoch": self.epoch, **metrics}
        self.val_history.append(row)
        if self.on_log is not None and self.world.is_main:
            self.on_log(self.step, {f"val_{k}": v for k, v in metrics.items()})
        metric = self.cfg.select_metric
        if metric is not None:
            if metric not in metrics:
                raise ConfigError(
                    f"{self.name}: select_metric {metric!r} is not a validation metric "
                    f"(have: {', '.join(sorted(metrics))})"
                )
            if self.best is None or metrics[metric] > self.best[metric]:
                self.best = dict(row)
                if self.world.is_main:
                    from albef.checkpoint import save_pretrained

                    save_pretrained(self.model, self.run_dir / "best")  # type: ignore[arg-type]
        if self.world.is_main:
            log.info("%s: validation at step %d: %s", self.name, self.step, _short(metrics))
        return metrics

    def fit(self) -> FitResult:
        cfg = self.cfg
        self._check_fingerprint()
        self._seed_fresh()
        source = self._resume_source()
        if source is not None:
            self._restore(source)
        elif self.world.is_main:
            self.history.truncate_after(-1)
            self.val_history.truncate_after(-1)
        self.model.train()
        started, start_step = time.perf_counter(), self.step
        validations: list[dict[str, float]] = []
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=self.name,
            unit="step",
            disable=not (self.progress and self.world.is_main),
            dynamic_ncols=True,
        )
        window: dict[str, float] = {}
        window_steps, window_start = 0, time.perf_counter()
        last_log: dict[str, float] = {}
        micro_per_epoch = self.steps_per_epoch * cfg.grad_accum
        global_batch = cfg.batch_size * self.world.world_size * cfg.grad_accum
        try:
            while self.step < self.total_steps and self.epoch < cfg.epochs:
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                batches = iter(self._loader())
                while self.batch_in_epoch < micro_per_epoch and self.step < self.total_steps:
                    terms = self._optimisation_step(batches)
                    self.step += 1
                    for k, v in terms.items():
                        window[k] = window.get(k, 0.0) + v
                    window_steps += 1
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        last_log = self._log(window, window_steps, window_start, global_batch)
                        bar.set_postfix(loss=f"{last_log['loss']:.3f}", lr=f"{last_log['lr']:.2e}")
                        window, window_steps, window_start = {}, 0, time.perf_counter()
                    periodic = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                    if periodic and self.batch_in_epoch < micro_per_epoch:  # epoch ends save below
                        self.save()
                del batches
                if self.batch_in_epoch >= micro_per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    due = cfg.validate_every and (
                        self.epoch % cfg.validate_every == 0 or self.epoch == cfg.epochs
                    )
                    if due:
                        metrics = self._run_validation()
                        if metrics is not None:
                            validations.append(metrics)
                    self.save()
                elif self.step >= self.total_steps:
                    self.save()  # max_steps reached mid-epoch
        finally:
            bar.close()
        seconds = time.perf_counter() - started
        done = self.step - start_step
        return FitResult(
            step=self.step,
            epochs_completed=self.epoch,
            resumed_from=self.resumed_from,
            seconds=seconds,
            samples_per_second=done * global_batch / seconds if seconds > 0 else 0.0,
            last_log=last_log,
            validations=validations,
            best=self.best,
        )

    def _optimisation_step(self, batches: Iterable) -> dict[str, float]:
        cfg = self.cfg
        set_lr(self.optimizer, self.schedule(self.step, self.steps_per_epoch))
        alpha = alpha_ramp(self.step, self.steps_per_epoch, cfg.alpha, cfg.alpha_ramp_epochs)
        terms: dict[str, float] = {}
        finite = True
        for micro in range(cfg.grad_accum):
            batch = self._to_device(next(batches))  # type: ignore[call-overload]
            self.batch_in_epoch += 1
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not self.world.distributed else self.ddp.no_sync()  # type: ignore[operator]
            with sync:
                with self._autocast():
                    out = self.forward(self.ddp, batch, alpha, self.choices)
                loss = out.loss / cfg.grad_accum
                for k, v in out.loss_terms().items():
                    terms[k] = terms.get(k, 0.0) + v / cfg.grad_accum
                finite = finite and bool(torch.isfinite(out.loss.detach()))
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
        flag = _all_reduce(torch.tensor([1.0 if finite else 0.0], device=self.device), dist.ReduceOp.MIN)
        if flag.item() < 1:
            latest = latest_checkpoint(self.ckpt_dir)
            where = "on this process" if not finite else "on another process"
            raise TrainingDiverged(
                f"{self.name}: non-finite loss at step {self.step + 1} (epoch {self.epoch}, "
                f"batch {self.batch_in_epoch}) {where}: {_short(terms)}; "
                f"lr={self.optimizer.param_groups[0]['lr']:.3g}, alpha={alpha:.3g}. Nothing was saved after "
                f"the last good checkpoint: {latest}"
            )
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        terms["lr"] = self.optimizer.param_groups[0]["lr"]
        terms["alpha"] = alpha
        temp = getattr(self.model, "temp", None)
        if isinstance(temp, torch.Tensor):
            terms["temp"] = float(temp.detach())
        return terms

    def _log(
        self, window: dict[str, float], steps: int, started: float, global_batch: int
    ) -> dict[str, float]:
        keys = sorted(window)
        values = torch.tensor([window[k] / steps for k in keys], dtype=torch.float64, device=self.device)
        values = _all_reduce(values) / self.world.world_size
        row = dict(zip(keys, values.tolist(), strict=True))
        elapsed = max(time.perf_counter() - started, 1e-9)
        row["samples_per_s"] = steps * global_batch / elapsed
        row = {"step": float(self.step), "epoch": self.step / self.steps_per_epoch, **row}
        self.history.append(row)
        if self.on_log is not None and self.world.is_main:
            self.on_log(self.step, row)
        return row


def _short(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" if math.isfinite(v) else f"{k}={v}" for k, v in sorted(values.items()))
