"""The one training loop every albef task uses.

Each optimisation step, in the official order: the learning rate from the official schedule
(:class:`albef.schedule.LRSchedule`, in steps) and the distillation weight from the alpha ramp;
``grad_accum`` micro-batches (forward under autocast on GPU, fp32 on CPU; backward; DDP's gradient
all-reduce only on the last one), the ALBEF forward itself updating the momentum encoders and queues once
per micro-batch, as officially; a check that the loss is finite on every rank; AdamW with the official
parameter groups.

What it guarantees:

* **Resume, bit for bit.** Checkpoints (:mod:`albef.train.checkpointing`: every ``checkpoint_every`` steps
  and at every epoch end, the last ``keep_checkpoints`` kept) hold every rank's training state, and the data
  order and augmentation are functions of ``(seed, epoch, index)`` (:mod:`albef.train.sampler`), so a run
  killed at any moment and resumed with ``resume: auto`` reaches the same weights as an uninterrupted one
  (exactly, on CPU).
* **Only matching checkpoints resume.** A checkpoint folder carries the fingerprint of the run that wrote
  it (training settings, model config, data, initial weights, albef's code). After a change it is moved aside to
  ``checkpoints.previous`` and training starts afresh, instead of silently continuing another run.
* **A damaged checkpoint does not stop a resume.** ``resume: auto`` skips one that cannot be read
  (truncated or corrupt after it was written) with a warning naming it and why, moves it into
  ``checkpoints/corrupt/`` (kept), and resumes from the newest one that reads.
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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from albef.config import (
    AT_LEAST_ONE,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    LossSwitches,
    range_problems,
)
from albef.device import PRECISIONS, autocast, resolve_precision
from albef.distributed import gather_objects
from albef.io import atomic_write_text
from albef.models.components import RandomChoices
from albef.safe_load import UnreadableCheckpoint
from albef.schedule import LRSchedule, alpha_ramp, set_lr
from albef.train.checkpointing import (
    CORRUPT_DIR,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_aside,
    set_rng_state,
)
from albef.train.optim import build_optimizer
from albef.train.sampler import EpochSampler, SeededSamples, preserved_rng
from albef.world import WorldInfo

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of one training run (a ``pretrain:`` or ``finetune_*:`` section of ``params.yaml``)."""

    epochs: int = field(default=1, metadata=AT_LEAST_ONE)
    # per process; the global batch is batch_size x processes (x grad_accum per step)
    batch_size: int = field(default=32, metadata=AT_LEAST_ONE)
    grad_accum: int = field(default=1, metadata=AT_LEAST_ONE)  # micro-batches per optimisation step
    lr: float = field(default=1e-4, metadata=POSITIVE)
    weight_decay: float = field(default=0.02, metadata=NON_NEGATIVE)
    warmup_lr: float = field(default=1e-5, metadata=NON_NEGATIVE)  # <= lr
    min_lr: float = field(default=1e-6, metadata=NON_NEGATIVE)  # <= lr: the cosine ends here
    # warm-up stairs of `warmup_stair` steps within epoch 0 (the official scheme)
    warmup_epochs: int = field(default=1, metadata=NON_NEGATIVE)
    warmup_stair: int = field(default=100, metadata=AT_LEAST_ONE)
    # distillation weight, ramped up over `alpha_ramp_epochs`
    alpha: float = field(default=0.4, metadata=FRACTION)
    alpha_ramp_epochs: float = field(default=1.0, metadata=NON_NEGATIVE)
    # max global grad norm; the official code does not clip
    grad_clip: float | None = field(default=None, metadata=POSITIVE)
    seed: int = 42
    # auto (bf16 on GPUs that have it, else fp16 + scaler; fp32 on CPU) | fp32 | bf16 | fp16
    precision: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N: where this process computes (albef.device)
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block (a GPU speed-up; checked before any work)
    num_workers: int = field(default=2, metadata=NON_NEGATIVE)
    # batches each worker loads ahead (with num_workers > 0)
    prefetch_factor: int = field(default=2, metadata=AT_LEAST_ONE)
    # steps between checkpoints (0: at epoch ends only)
    checkpoint_every: int = field(default=0, metadata=NON_NEGATIVE)
    keep_checkpoints: int = field(default=2, metadata=NON_NEGATIVE)
    resume: str = "auto"  # auto: newest matching checkpoint | never | path to a checkpoint file
    log_every: int = field(default=10, metadata=AT_LEAST_ONE)  # steps between log rows
    validate_every: int = field(default=1, metadata=NON_NEGATIVE)  # epochs between validations (0: never)
    select_metric: str | None = None  # export the weights with the best value of this validation metric
    max_steps: int = field(default=0, metadata=NON_NEGATIVE)  # stop after this many steps (0: all epochs)
    # which loss terms the forward computes (flat keys of the section: itc, mod_itc, ... / mod); the stage hands
    # them to the model (``use_losses``), and they are part of the run's fingerprint like every field here
    losses: LossSwitches = field(default_factory=LossSwitches)

    def __post_init__(self) -> None:
        # Each field's own range is checked where params.yaml is read (build_dataclass: the error names the
        # section and key); here, what a direct construction must hold too and what relates two fields.
        problems = range_problems(self)
        for name in ("min_lr", "warmup_lr"):
            if getattr(self, name) > self.lr:
                problems.append(f"{name} ({getattr(self, name)}) must be <= lr ({self.lr})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS} (got {self.precision!r})")
        if problems:
            raise ConfigError("; ".join(problems))

    def fingerprint_fields(self) -> dict[str, Any]:
        """The settings that change the numbers a run produces (not logging, workers or checkpointing)."""
        ignore = {
            "num_workers",
            "prefetch_factor",
            "checkpoint_every",
            "keep_checkpoints",
            "resume",
            "log_every",
            "max_steps",
            "device",  # how, not what, a run computes: a checkpoint resumes on another device
        }
        return {k: v for k, v in asdict(self).items() if k not in ignore}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and every loss term."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


class Step(Protocol):
    """What a task's forward returns: ``loss`` with its graph, and ``loss_terms()``: detached scalar tensors on
    the model's device (floats would make the host wait for the GPU at every step)."""

    loss: torch.Tensor

    def loss_terms(self) -> dict[str, torch.Tensor]: ...


ForwardFn = Callable[[nn.Module, dict[str, torch.Tensor], float, RandomChoices], Step]
ValidateFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class FitResult:
    step: int
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


def compile_model(model: nn.Module) -> int:
    """``torch.compile`` every transformer block of ``model`` in place (ViT blocks, BERT/fusion layers, the VQA
    decoder's layers); returns how many. Blocks, not whole encoders: a block's graph is the same in every
    layer and every mode (text, fusion, momentum), so it compiles once and recompiles little when the text
    length changes; in place, so state-dict keys and checkpoints are unchanged."""
    from timm.models.vision_transformer import Block

    from albef.models.xbert import FusionLayer

    blocks = [m for m in model.modules() if isinstance(m, (Block, FusionLayer))]
    for block in blocks:
        block.compile()
    return len(blocks)


def check_compiler(device: torch.device, setting: str) -> None:
    """Compile and run a tiny block on ``device`` now, so a machine where torch.compile cannot work (no C++
    compiler, no Triton, an unsupported GPU) fails before any work with the setting's name, not at step 1."""
    probe = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8)).to(device)
    try:
        out = torch.compile(probe)(torch.randn(4, 8, device=device, requires_grad=True))
        out.sum().backward()
    except Exception as exc:  # the compiler raises many kinds (BackendCompilerFailed, OSError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{setting}: true, but torch.compile does not work on this machine ({type(exc).__name__}: {first}); "
            f"set {setting}: false"
        ) from exc


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
        self.rows().append({k: f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in row.items()})
        self._write()

    def _write(self) -> None:
        rows = self.rows()
        columns = list(dict.fromkeys(k for r in rows for k in r))  # in order of first appearance
        lines = [",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, "\n".join(lines) + "\n")


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

        samples = len(dataset)  # type: ignore[arg-type]
        # shuffled, whole batches only (the sampler's defaults)
        self.sampler = EpochSampler(samples, cfg.batch_size, world.rank, world.world_size, seed=cfg.seed)
        self.steps_per_epoch = self.sampler.batches_per_epoch // cfg.grad_accum
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"{name}: one epoch gives {self.sampler.batches_per_epoch} batches per process, fewer than "
                f"grad_accum={cfg.grad_accum}; lower grad_accum or batch_size"
            )
        self.total_steps = min(cfg.epochs * self.steps_per_epoch, cfg.max_steps or math.inf)
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
        if cfg.compile:
            check_compiler(device, f"{name}.compile")
            compile_model(model)
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
        # Each step's finiteness flag and loss terms since the last check, on the device (_optimisation_step).
        self._unchecked: list[tuple[dict[str, Any], torch.Tensor, dict[str, torch.Tensor]]] = []

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

    def _resume(self) -> bool:
        """Restore the checkpoint ``resume`` names; whether one was restored.

        ``auto`` tries the checkpoints newest first: one that cannot be read (truncated, corrupt) is skipped
        with a warning naming it and why, and moved aside into ``checkpoints/corrupt/`` (kept, but no longer
        listed); with none left the run starts afresh. An explicit path that cannot be read is an error."""
        resume = self.cfg.resume
        if resume == "never":
            return False
        if resume != "auto":
            path = Path(resume)
            if not path.is_file():
                raise FileNotFoundError(f"{self.name}: resume checkpoint not found: {path}")
            self._restore(path)
            return True
        skipped: list[Path] = []
        restored = False
        for path in reversed(list_checkpoints(self.ckpt_dir)):
            try:
                self._restore(path)  # reads the whole file before it changes anything
            except UnreadableCheckpoint as exc:
                skipped.append(path)
                if self.world.is_main:
                    log.warning(
                        "%s: skipping checkpoint %s: %s; it is moved to %s/, trying the one before it",
                        self.name,
                        path,
                        exc.reason,
                        self.ckpt_dir / CORRUPT_DIR,
                    )
                continue
            restored = True
            break
        self._barrier()  # every process has tried the files before any is moved
        if skipped and self.world.is_main:
            for path in skipped:
                set_aside(path)
            if not restored:
                log.warning(
                    "%s: no readable checkpoint left in %s: starting afresh", self.name, self.ckpt_dir
                )
        return restored

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
    def save(self) -> Path | None:
        self._check_finite()
        ranks = gather_objects({"rng": rng_state(), "choices": self.choices_gen.get_state().cpu()})
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
        """One loader for the whole run. Its workers persist from epoch to epoch: starting them afresh
        stalled every epoch's first steps (samples/s 80 then 1,400 on a GPU). The sampler runs in this
        process, so :meth:`EpochSampler.set_epoch` before each ``iter()`` still picks the epoch's order."""
        workers = self.cfg.num_workers
        return DataLoader(
            SeededSamples(self.dataset, self.cfg.seed),
            batch_size=self.cfg.batch_size,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=self.collate,
            pin_memory=self.device.type == "cuda",
            # Its own generator, so creating the iterator never draws from the global stream.
            generator=torch.Generator(),
            persistent_workers=workers > 0,
            prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
        )

    @staticmethod
    def _stop_workers(loader: DataLoader) -> None:
        """Stop persistent workers now: an exception's traceback keeps the loader, and so its worker
        processes, alive long after ``fit`` has failed."""
        iterator = getattr(loader, "_iterator", None)
        loader._iterator = None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def _run_validation(self) -> dict[str, float] | None:
        if self.validate is None:
            return None
        self.model.eval()
        with preserved_rng(), torch.no_grad():
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
        if not self._resume() and self.world.is_main:
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
        loader = self._loader()
        try:
            while self.step < self.total_steps and self.epoch < cfg.epochs:
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)  # before iter(): it fixes the order
                batches = iter(loader)  # the same workers; batches left over by grad_accum are dropped
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
                        paused = time.perf_counter()
                        self.save()
                        window_start += time.perf_counter() - paused  # samples_per_s counts training only
                if self.batch_in_epoch >= micro_per_epoch:
                    paused = time.perf_counter()
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    due = cfg.validate_every and (
                        self.epoch % cfg.validate_every == 0 or self.epoch == cfg.epochs
                    )
                    if due and (metrics := self._run_validation()) is not None:
                        validations.append(metrics)
                    self.save()
                    window_start += time.perf_counter() - paused
                elif self.step >= self.total_steps:
                    self.save()  # max_steps reached mid-epoch
        finally:
            bar.close()
            self._stop_workers(loader)
        seconds = time.perf_counter() - started
        done = self.step - start_step
        return FitResult(
            step=self.step,
            resumed_from=self.resumed_from,
            seconds=seconds,
            samples_per_second=done * global_batch / seconds if seconds > 0 else 0.0,
            last_log=last_log,
            validations=validations,
            best=self.best,
        )

    def _optimisation_step(self, batches: Iterator) -> dict[str, torch.Tensor | float]:
        """One optimisation step. Nothing in it reads a GPU value on the host: the loss terms stay on the
        device until :meth:`_log` averages them, and a non-finite loss is recorded on the device and raised
        by :meth:`_check_finite` at the next log row or checkpoint (before anything is saved)."""
        cfg = self.cfg
        set_lr(self.optimizer, self.schedule(self.step, self.steps_per_epoch))
        alpha = alpha_ramp(self.step, self.steps_per_epoch, cfg.alpha, cfg.alpha_ramp_epochs)
        terms: dict[str, torch.Tensor | float] = {}
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
            self.batch_in_epoch += 1
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not self.world.distributed else self.ddp.no_sync()  # type: ignore[operator]
            with sync, self._out_of_memory_hint():
                with autocast(self.device, self.amp_dtype):
                    out = self.forward(self.ddp, batch, alpha, self.choices)
                loss = out.loss / cfg.grad_accum
                for k, v in out.loss_terms().items():
                    terms[k] = terms.get(k, 0.0) + v.float() / cfg.grad_accum
                finite = finite & torch.isfinite(out.loss.detach())
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        # this step's finiteness flag and loss terms (device tensors) wait on the device for _check_finite
        context = {"step": self.step + 1, "epoch": self.epoch, "batch": self.batch_in_epoch, "alpha": alpha}
        context["lr"] = self.optimizer.param_groups[0]["lr"]
        self._unchecked.append((context, finite, dict(terms)))
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
            terms["temp"] = temp.detach().float().clone()
        return terms

    @contextlib.contextmanager
    def _out_of_memory_hint(self):
        """A GPU out-of-memory error names the batch size and the two settings that trade speed for memory."""
        try:
            yield
        except torch.cuda.OutOfMemoryError as exc:
            cfg = self.cfg
            raise torch.cuda.OutOfMemoryError(
                f"{self.name}: the GPU ran out of memory at batch_size {cfg.batch_size} per process "
                f"(grad_accum {cfg.grad_accum}, grad_checkpointing {str(cfg.grad_checkpointing).lower()}). "
                f"Lower {self.name}.batch_size and raise {self.name}.grad_accum by the same factor (same "
                f"optimisation, less memory), or set {self.name}.grad_checkpointing: true. {exc}"
            ) from exc

    def _check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` when any rank saw a non-finite loss since the last check. Called
        before every log row and every checkpoint, so nothing is saved after a bad step."""
        # the one host read
        flags = torch.stack([finite for _, finite, _ in self._unchecked]).tolist() if self._unchecked else []
        bad = next((i for i, ok in enumerate(flags) if not ok), None)
        mine = math.inf if bad is None else self._unchecked[bad][0]["step"]
        # The earliest bad step over all ranks (inf when none).
        earliest = float(
            _all_reduce(
                torch.tensor([mine], dtype=torch.float64, device=self.device), dist.ReduceOp.MIN
            ).item()
        )
        if not math.isfinite(earliest):
            self._unchecked.clear()
            return
        if bad is not None:
            context, _, losses = self._unchecked[bad]
            terms = {k: float(v) for k, v in losses.items()}
            where = (
                f"(epoch {context['epoch']}, batch {context['batch']}) on this process: {_short(terms)}; "
                f"lr={context['lr']:.3g}, alpha={context['alpha']:.3g}"
            )
        else:
            where = "on another process"
        raise TrainingDiverged(
            f"{self.name}: non-finite loss at step {int(earliest)} {where} (found at step {self.step}). Nothing "
            f"was saved after the last good checkpoint: {latest_checkpoint(self.ckpt_dir)}"
        )

    def _log(
        self, window: dict[str, float], steps: int, started: float, global_batch: int
    ) -> dict[str, float]:
        self._check_finite()
        keys = sorted(window)
        # The loss terms are device tensors summed over the window: this is the step's only read of them.
        values = torch.stack(
            [torch.as_tensor(window[k], device=self.device).to(torch.float64) / steps for k in keys]
        )
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
