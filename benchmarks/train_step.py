"""Benchmark one full ALBEF pretraining step per model preset, dtype and device.

What is measured
    One optimisation step of :class:`albef.models.pretrain.ALBEFPretrain`, exactly as a training loop runs it:
    forward (ITC + ITM + MLM with momentum distillation; the forward also performs the momentum-encoder EMA
    update and the queue update, as the official code does), ``loss.backward()``, and a
    AdamW step (lr 1e-4, weight decay 0.02) built by :func:`albef.train.optim.build_optimizer`: the official
    parameter groups and PyTorch's fused AdamW kernel (CPU and CUDA) over the trainable parameters only (the
    momentum encoders have ``requires_grad=False``). ``--optimizer loop`` times the per-tensor AdamW loop the
    official code gets from ``torch.optim.AdamW``'s defaults on CPU, for comparison.
    Data loading is *not* measured: one synthetic batch, built once per row, is reused for every step.

How it is timed
    ``--warmup`` untimed steps, then ``--steps`` timed steps; each step is timed on its own with
    ``time.perf_counter`` and the device synchronised before and after it. The table reports the median
    (and the minimum, which is less sensitive to other work on a shared machine).
    bf16 rows run the forward under ``torch.autocast(device_type="cuda", dtype=torch.bfloat16)`` (weights and
    optimizer state stay fp32); CPU rows run in fp32 only.

Peak memory (model + optimizer state + activations of the row)
    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak statistics at the start of the row.
    CPU: peak resident set size minus the RSS at the start of the row. On Linux the kernel's peak-RSS counter
    (``VmHWM``) is reset per row through ``/proc/self/clear_refs``; elsewhere the fallback is
    ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, a process-lifetime peak, so later rows can read low there.
    The method used is printed in the header.

Synthetic inputs
    Images: uniform pixels in [0, 1) normalised with ALBEF's (CLIP) mean/std, at the preset's image size.
    Text: length ``min(25, max_positions)``, ``[CLS]`` first, ids uniform in [5, vocab); every other row has
    its last 1..L/4 positions padded (``pad_token_id``, attention mask 0). Everything is seeded per row.

Run::

    python benchmarks/train_step.py                                  # tiny, small, base; fp32 (+bf16 on CUDA)
    python benchmarks/train_step.py --presets tiny,small --threads 2
    python benchmarks/train_step.py --presets base --steps 2 --warmup 1 --batch-size 2
    python benchmarks/train_step.py --device cuda --dtypes fp32,bf16 --batch-size base=32 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from albef.config import PRESETS, ModelConfig, load_model_config
from albef.models.pretrain import ALBEFPretrain
from albef.train.engine import compile_model as compile_blocks
from albef.train.optim import build_optimizer

# ALBEF's image normalisation (the CLIP statistics used by the official transforms).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_LENGTH = 25
FIRST_REGULAR_ID = 5  # ids below this are special tokens in every preset
LR = 1e-4
WEIGHT_DECAY = 0.02
ALPHA = 0.4

# Defaults per preset: (batch, CPU steps, CPU warmup). CUDA uses CUDA_STEPS / CUDA_WARMUP for every preset.
DEFAULTS: dict[str, tuple[int, int, int]] = {"tiny": (8, 20, 3), "small": (16, 10, 2), "base": (4, 3, 1)}
CUDA_STEPS, CUDA_WARMUP = 20, 5
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------- memory measurement
class CpuPeakMemory:
    """Peak RSS of this process during a block, minus the RSS at its start (bytes)."""

    def __init__(self) -> None:
        self.use_proc = self._can_reset_hwm()
        self.method = (
            "peak RSS delta (Linux VmHWM, reset per row via /proc/self/clear_refs)"
            if self.use_proc
            else "peak RSS delta (getrusage ru_maxrss: process-lifetime peak, later rows may read low)"
        )
        self._start = 0

    @staticmethod
    def _can_reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _proc_status_kib("VmHWM") is not None and _proc_status_kib("VmRSS") is not None
        except OSError:
            return False

    def start(self) -> None:
        _release_memory()
        if self.use_proc:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self._start = (_proc_status_kib("VmRSS") or 0) * 1024
        else:
            self._start = _ru_maxrss_bytes()

    def peak_delta(self) -> int:
        if self.use_proc:
            return (_proc_status_kib("VmHWM") or 0) * 1024 - self._start
        return _ru_maxrss_bytes() - self._start


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


def _release_memory() -> None:
    """Free what earlier rows left behind so that the next row's baseline is honest."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---------------------------------------------------------------------- results
@dataclass
class Row:
    preset: str
    device: str
    dtype: str
    batch: int
    image_size: int
    text_length: int
    queue_size: int
    params_m: float = math.nan
    sec_per_step: float = math.nan  # median
    min_sec_per_step: float = math.nan
    samples_per_s: float = math.nan
    peak_mem_mib: float = math.nan
    steps: int = 0
    warmup: int = 0
    step_times_s: list[float] = field(default_factory=list)
    final_loss: float = math.nan
    gflop_per_sample: float = math.nan  # counted (torch.utils.flop_counter) over forward + backward
    achieved_tflops: float = math.nan  # gflop_per_sample x samples/s
    peak_share: float = math.nan  # achieved / the device's measured matmul peak in this dtype
    host_syncs: str = "-"  # CUDA: "none" when a step runs under torch.cuda.set_sync_debug_mode("error")
    status: str = "ok"  # ok | OOM | error: ...


COLUMNS: list[tuple[str, int, Callable[[Row], str]]] = [
    ("preset", 6, lambda r: r.preset),
    ("device", 6, lambda r: r.device),
    ("dtype", 5, lambda r: r.dtype),
    ("batch", 5, lambda r: str(r.batch)),
    ("img", 4, lambda r: str(r.image_size)),
    ("params(M)", 9, lambda r: _fmt(r.params_m, ".2f")),
    ("s/step", 8, lambda r: _fmt(r.sec_per_step, ".4f")),
    ("min s", 8, lambda r: _fmt(r.min_sec_per_step, ".4f")),
    ("samples/s", 9, lambda r: _fmt(r.samples_per_s, ".4g")),
    ("peak MiB", 8, lambda r: _fmt(r.peak_mem_mib, ".0f")),
    ("GFLOP/smp", 9, lambda r: _fmt(r.gflop_per_sample, ".4g")),
    ("TFLOP/s", 7, lambda r: _fmt(r.achieved_tflops, ".2f")),
    ("of peak", 7, lambda r: _fmt(100 * r.peak_share, ".1f") + ("%" if math.isfinite(r.peak_share) else "")),
    ("syncs", 5, lambda r: r.host_syncs),
    ("status", 6, lambda r: r.status),
]


def _fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def table_header() -> str:
    head = "  ".join(f"{name:>{width}}" for name, width, _ in COLUMNS)
    return f"{head}\n{'-' * len(head)}"


def table_row(row: Row) -> str:
    return "  ".join(f"{get(row):>{width}}" for _, width, get in COLUMNS)


# ---------------------------------------------------------------------- the benchmark
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def synthetic_batch(
    cfg: ModelConfig, batch: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised random images and token ids as a tokenizer would produce them (see module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    images = (torch.rand(batch, 3, size, size, generator=gen) - mean) / std

    t = cfg.text
    length = min(TEXT_LENGTH, t.max_positions)
    low = min(FIRST_REGULAR_ID, t.vocab_size - 1)
    input_ids = torch.randint(low, t.vocab_size, (batch, length), generator=gen)
    input_ids[:, 0] = t.cls_token_id
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    max_pad = max(1, length // 4)
    if length > 2:
        for i in range(1, batch, 2):  # every other row is padded at its end
            pad = int(torch.randint(1, max_pad + 1, (1,), generator=gen))
            pad = min(pad, length - 2)  # keep [CLS] and at least one real token
            input_ids[i, length - pad :] = t.pad_token_id
            attention_mask[i, length - pad :] = 0
    return images.to(device), input_ids.to(device), attention_mask.to(device)


def make_optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "loop":  # what the official code runs on CPU: torch.optim.AdamW's per-tensor default
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=False)
    return build_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def run_row(
    preset: str,
    dtype_name: str,
    device: torch.device,
    batch: int,
    steps: int,
    warmup: int,
    seed: int,
    grad_checkpointing: bool,
    cpu_mem: CpuPeakMemory,
    optimizer_kind: str = "fused",
    image_size: int | None = None,
    queue_size: int | None = None,
    compile_model: bool = False,
    peak_tflops: float | None = None,
    model_params: Path | None = None,
) -> Row:
    cfg = load_model_config(model_params) if model_params else PRESETS[preset]()
    if image_size:
        cfg.vision.image_size = image_size
    if queue_size:
        cfg.queue_size = queue_size
    if cfg.queue_size % batch:  # the queue is a ring buffer advanced by the batch
        cfg.queue_size = batch * math.ceil(cfg.queue_size / batch)
    row = Row(
        preset=preset,
        device=device.type,
        dtype=dtype_name,
        batch=batch,
        image_size=cfg.vision.image_size,
        text_length=min(TEXT_LENGTH, cfg.text.max_positions),
        queue_size=cfg.queue_size,
        steps=steps,
        warmup=warmup,
    )
    state: dict[str, Any] = {}
    try:
        if device.type == "cuda":
            _release_memory()
            torch.cuda.reset_peak_memory_stats(device)
        else:
            cpu_mem.start()
        _measure(
            row,
            cfg,
            DTYPES[dtype_name],
            device,
            seed,
            grad_checkpointing,
            state,
            optimizer_kind,
            compile_model,
        )
        if peak_tflops and math.isfinite(row.achieved_tflops):
            row.peak_share = row.achieved_tflops / peak_tflops
        if device.type == "cuda":
            row.peak_mem_mib = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            row.peak_mem_mib = cpu_mem.peak_delta() / 2**20
    except Exception as exc:  # one failing row must not stop the others
        if is_oom(exc):
            row.status = "OOM"
        else:
            row.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        state.clear()  # drop model, optimizer, activations before the next row
        _release_memory()
    return row


def _measure(
    row: Row,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    grad_checkpointing: bool,
    state: dict[str, Any],
    optimizer_kind: str,
    compile_model: bool = False,
) -> None:
    seed_everything(seed)
    model = ALBEFPretrain(cfg).to(device).train()
    model.set_grad_checkpointing(grad_checkpointing)
    if compile_model:  # what compile: true does in training
        compile_blocks(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, optimizer_kind)
    state.update(model=model, optimizer=optimizer)
    row.params_m = sum(p.numel() for p in params) / 1e6
    images, input_ids, attention_mask = synthetic_batch(cfg, row.batch, device, seed)
    state.update(batch=(images, input_ids, attention_mask))
    use_autocast = dtype != torch.float32  # CPU rows are fp32 only (checked in main)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_autocast):
            out = model(images, input_ids, attention_mask, alpha=ALPHA)
        out.loss.backward()
        optimizer.step()
        return out.loss.detach()

    times: list[float] = []
    loss = torch.tensor(math.nan)
    for i in range(row.warmup + row.steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        elapsed = time.perf_counter() - t0
        if i >= row.warmup:
            times.append(elapsed)
    row.step_times_s = times
    row.final_loss = float(loss)
    if times:
        row.sec_per_step = statistics.median(times)
        row.min_sec_per_step = min(times)
        row.samples_per_s = row.batch / row.sec_per_step
    if not math.isfinite(row.final_loss):
        row.status = "non-finite loss"
    # FLOPs are counted on one more step (not timed): matmuls, convolutions and attention, forward + backward.
    with FlopCounterMode(display=False) as counter:
        step()
    row.gflop_per_sample = counter.get_total_flops() / row.batch / 1e9
    row.achieved_tflops = row.gflop_per_sample * row.samples_per_s / 1e3
    if device.type == "cuda":
        # One more step with any host synchronisation turned into an error: the step must not wait for the GPU.
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            row.host_syncs = "none"
        except RuntimeError as exc:
            row.host_syncs = "yes"
            print(f"  host synchronisation inside the step: {str(exc).splitlines()[0]}", file=sys.stderr)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's attainable dense matmul rate in ``dtype`` (TFLOP/s), measured: the best of a few large
    square matmuls. The share of peak is against this, not a datasheet figure."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(3 if device.type == "cpu" else 10):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


# ---------------------------------------------------------------------- command line
def parse_per_preset(
    text: str | None, presets: list[str], what: str, allow_zero: bool = False
) -> dict[str, int]:
    """``"8"`` -> every preset; ``"tiny=8,base=2"`` -> those presets (others keep their defaults)."""
    if text is None:
        return {}
    text = text.strip()
    if "=" not in text:
        return dict.fromkeys(presets, _positive_int(text, what, allow_zero))
    values: dict[str, int] = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in PRESETS and name != "params":
            raise ValueError(f"{what}: unknown preset {name!r}; choose from {sorted(PRESETS)}")
        values[name] = _positive_int(value, what, allow_zero)
    return values


def _positive_int(text: str, what: str, allow_zero: bool = False) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{what}: expected an integer, got {text!r}") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(
            f"{what}: expected a {'non-negative' if allow_zero else 'positive'} integer, got {value}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time one ALBEF pretraining step (forward + backward + AdamW + momentum update).",
    )
    parser.add_argument("--presets", default="tiny,small,base", help="comma-separated presets (default: all)")
    parser.add_argument(
        "--batch-size",
        default=None,
        help="N for every preset, or per preset like tiny=8,base=2; default: "
        + ", ".join(f"{k} {v[0]}" for k, v in DEFAULTS.items()),
    )
    parser.add_argument(
        "--steps",
        default=None,
        help="timed steps (N or per preset); default: CPU "
        + ", ".join(f"{k} {v[1]}" for k, v in DEFAULTS.items())
        + f"; CUDA {CUDA_STEPS}",
    )
    parser.add_argument(
        "--warmup",
        default=None,
        help="untimed warm-up steps (N or per preset); default: CPU "
        + ", ".join(f"{k} {v[2]}" for k, v in DEFAULTS.items())
        + f"; CUDA {CUDA_WARMUP}",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: auto")
    parser.add_argument(
        "--dtypes", default=None, help="comma-separated: fp32, bf16 (default: fp32 on CPU, fp32,bf16 on CUDA)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    parser.add_argument("--grad-checkpointing", action="store_true", help="enable activation checkpointing")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the encoders (as compile: true)"
    )
    parser.add_argument(
        "--model-params",
        type=Path,
        default=None,
        help="take the model from this params file's model section (e.g. one written by albef profile gpu "
        "--write) instead of --presets; the row is named 'params'",
    )
    parser.add_argument("--image-size", type=int, default=None, help="override the presets' image size")
    parser.add_argument("--queue-size", type=int, default=None, help="override the presets' queue size")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak in TFLOP/s for the share-of-peak column (default: measured per dtype with a "
        "large matmul; the datasheet figure is higher)",
    )
    parser.add_argument(
        "--optimizer",
        choices=["fused", "loop"],
        default="fused",
        help="fused: albef's AdamW (official groups, fused kernel); loop: torch's per-tensor AdamW (default: fused)",
    )
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument(
        "--json", type=Path, default=None, metavar="OUT.json", help="also write the results here"
    )
    return parser


def environment(device: torch.device, memory_method: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": device.type,
        "memory_method": memory_method,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            device_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    else:
        env["device_name"] = _cpu_name()
    if hasattr(os, "getloadavg"):
        env["load_average_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine skews CPU timings
    return env


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if args.model_params:
        presets = ["params"]
    unknown = [p for p in presets if p not in PRESETS and not args.model_params]
    if unknown or not presets:
        parser.error(f"--presets: unknown {unknown}; choose from {sorted(PRESETS)}")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    dtypes = [
        d.strip() for d in (args.dtypes or ("fp32,bf16" if device.type == "cuda" else "fp32")).split(",")
    ]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        parser.error(f"--dtypes: unknown {bad}; choose from {sorted(DTYPES)}")
    if device.type == "cpu" and dtypes != ["fp32"]:
        parser.error("--dtypes: CPU runs in fp32 only")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    try:
        batch = parse_per_preset(args.batch_size, presets, "--batch-size")
        steps = parse_per_preset(args.steps, presets, "--steps")
        warmup = parse_per_preset(args.warmup, presets, "--warmup", allow_zero=True)
    except ValueError as exc:
        parser.error(str(exc))

    cpu_mem = CpuPeakMemory()
    memory_method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else cpu_mem.method
    env = environment(device, memory_method)
    print("ALBEF pretraining step: forward (+ momentum EMA and queue update) + backward + AdamW step")
    env["optimizer"] = (
        "AdamW, fused kernel, official groups" if args.optimizer == "fused" else "AdamW per-tensor loop"
    )
    for key, value in env.items():
        print(f"  {key:<22} {value}")

    peaks: dict[str, float] = {}
    for dtype_name in dtypes:
        peaks[dtype_name] = args.peak_tflops or matmul_peak_tflops(device, DTYPES[dtype_name])
        how = "given" if args.peak_tflops else "measured, large matmul"
        print(f"  {dtype_name} peak ({how}): {peaks[dtype_name]:.3g} TFLOP/s")
    env["peak_tflops"] = peaks
    print()
    print(table_header(), flush=True)

    rows: list[Row] = []
    for preset in presets:
        default_batch, cpu_steps, cpu_warmup = DEFAULTS.get(preset, DEFAULTS["small"])
        on_cuda = device.type == "cuda"
        for dtype_name in dtypes:
            row = run_row(
                preset,
                dtype_name,
                device,
                batch=batch.get(preset, default_batch),
                steps=steps.get(preset, CUDA_STEPS if on_cuda else cpu_steps),
                warmup=warmup.get(preset, CUDA_WARMUP if on_cuda else cpu_warmup),
                seed=args.seed,
                grad_checkpointing=args.grad_checkpointing,
                cpu_mem=cpu_mem,
                optimizer_kind=args.optimizer,
                image_size=args.image_size,
                queue_size=args.queue_size,
                compile_model=args.compile,
                peak_tflops=peaks[dtype_name],
                model_params=args.model_params,
            )
            rows.append(row)
            print(table_row(row), flush=True)
    print(f"\ns/step: median over timed steps; samples/s: batch / median; peak MiB: {memory_method}")
    print(
        "GFLOP/smp: counted by torch.utils.flop_counter (forward + backward); of peak: against the measured peak"
    )

    if args.json is not None:
        payload = {
            "environment": env,
            "grad_checkpointing": args.grad_checkpointing,
            "compile": args.compile,
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(_json_safe(payload), indent=2, default=str, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    failed = [r for r in rows if r.status not in ("ok", "OOM")]
    return 1 if failed else 0


def _json_safe(value: Any) -> Any:
    """NaN -> null (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
