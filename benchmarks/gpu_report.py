"""The one table of ``benchmarks/gpu_check.sh``: reads the JSON files and logs it left in its output folder and
prints a Markdown table (what was measured, the figure, and the bar it is held to where issue 13 sets one).

    python benchmarks/gpu_report.py gpu-check/
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _json_lines(path: Path) -> list[dict]:
    """The JSON objects printed one per line in a log (the official-speed scripts print one)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _f(value: Any, spec: str = ".1f", unit: str = "") -> str:
    return "-" if value is None else f"{format(value, spec)}{unit}"


def loader_rows(out: Path) -> list[tuple[str, str, str]]:
    rows = []
    loaded = _load(out / "loader.json") or []
    for size in sorted({r["image_size"] for r in loaded}):
        mine = [r for r in loaded if r["image_size"] == size]
        one = next((r for r in mine if r["loader"] == "seeded" and r["workers"] == 0), None)
        many = max(
            (r for r in mine if r["loader"] == "seeded" and r["workers"]),
            key=lambda r: r["workers"],
            default=None,
        )
        if one:
            rows.append(
                (
                    f"loader {size} px, 1 process",
                    f"{_f(one['samples_per_s'], '.0f')} samples/s; seeding "
                    f"{_f(one['overhead_pct'], '.1f')} % of the time",
                    "seeding <= 10 %",
                )
            )
        if many:
            rows.append(
                (
                    f"loader {size} px, {many['workers']} workers",
                    f"{_f(many['samples_per_s'], '.0f')} samples/s; "
                    f"epoch-start stall {_f(many['stall_s'], '.3f')} s (fresh workers {_f(many['stall_fresh_s'], '.3f')} s)",
                    "",
                )
            )
    return rows


def step_rows(out: Path) -> list[tuple[str, str, str]]:
    rows = []
    albef: dict[tuple[str, int], dict] = {}
    for name in ("step", "step_b128", "step_compiled"):
        data = _load(out / f"{name}.json") or {}
        peaks = (data.get("environment") or {}).get("peak_tflops") or {}
        for r in data.get("rows", []):
            tag = f"{r['preset']} {r['image_size']} px, batch {r['batch']}, {r['dtype']}"
            tag += ", compiled" if data.get("compile") else ""
            if r.get("status") != "ok":
                rows.append((f"step {tag}", r.get("status", "?"), ""))
                continue
            if not data.get("compile"):  # the official code is compared with albef's eager step
                albef.setdefault((r["dtype"], r["batch"]), r)
            share = r.get("peak_share")
            rows.append(
                (
                    f"albef step {tag}",
                    f"{_f(r['samples_per_s'], '.1f')} samples/s, {_f(r.get('gflop_per_sample'), '.3g')} GFLOP/sample, "
                    f"{_f(r.get('achieved_tflops'), '.3g')} TFLOP/s = {_f(None if share is None else 100 * share, '.1f')} % "
                    f"of the measured {r['dtype']} peak ({_f(peaks.get(r['dtype']), '.3g')} TFLOP/s), "
                    f"{_f(r.get('peak_mem_mib', 0) / 1024, '.1f')} GiB, host syncs: {r.get('host_syncs', '-')}",
                    ">= 35 % of peak (bf16)" if r["dtype"] == "bf16" else "",
                )
            )
    for mode, dtype in (("none", "fp32"), ("bf16", "bf16")):
        for r in _json_lines(out / f"official_{mode}.log"):
            ours = albef.get((dtype, r.get("batch")))
            ratio = ours["samples_per_s"] / r["samples_per_s"] if ours and r.get("samples_per_s") else None
            rows.append(
                (
                    f"official step {r.get('image_res')} px, batch {r.get('batch')}, {dtype}"
                    + (" (autocast)" if mode == "bf16" else ""),
                    f"{_f(r.get('samples_per_s'), '.1f')} samples/s, {_f((r.get('peak_mib') or 0) / 1024, '.1f')} GiB; "
                    f"albef / official = {_f(ratio, '.2f', 'x')}",
                    ">= 3x" if dtype == "bf16" else ">= 1.3x",
                )
            )
    return rows


def retrieval_rows(out: Path) -> list[tuple[str, str, str]]:
    data = _load(out / "retrieval.json")
    if not data:
        return []
    official, albef = data.get("official") or {}, data.get("albef") or {}
    return [
        (
            f"retrieval evaluation ({data.get('device_name', data.get('device', '?'))}, {data.get('dtype', '?')}, "
            f"{data.get('images', '?')} images x {data.get('texts', '?')} texts, k_test {data.get('k_test', '?')})",
            f"albef {_f(albef.get('total_s'), '.2f')} s, official {_f(official.get('total_s'), '.2f')} s: "
            f"{_f(data.get('speedup_total'), '.2f', 'x')} (ITM re-ranking {_f(data.get('speedup_itm'), '.2f', 'x')}); "
            f"identical rankings: {data.get('identical_rankings', '?')}",
            ">= 5x, identical rankings",
        )
    ]


def pipeline_rows(out: Path) -> list[tuple[str, str, str]]:
    data = _load(out / "pipeline.json")
    if not data:
        return []
    rows = [
        (
            f"profile {data['profile']}: whole pipeline ({len(data['stages'])} stages"
            + ("" if data.get("finished") else ", NOT finished")
            + ")",
            f"{data['seconds']:.0f} s ({data['seconds'] / 60:.1f} min)",
            "<= 10 min",
        )
    ]
    for stage in data["stages"]:
        shown = ", ".join(f"{k} {v:g}" for k, v in stage["metrics"].items())
        rows.append((f"  {stage['stage']}", f"{stage['seconds']:.0f} s; {shown}", ""))
    history = Path(data.get("work", "")) / "runs" / "pretrain" / "history.csv"
    step = _load(out / "profile_step.json") or {}
    pure = next((r.get("samples_per_s") for r in step.get("rows", []) if r.get("status") == "ok"), None)
    if history.is_file():
        with open(history, newline="") as fh:
            logged = [float(r["samples_per_s"]) for r in csv.DictReader(fh) if float(r["step"]) > 20]
        if logged:
            rate = statistics.median(logged)
            ratio = rate / pure if pure else None
            rows.append(
                (
                    "trainer's logged samples/s after step 20 (pretrain, profile) vs the pure step",
                    f"{rate:.0f} vs {_f(pure, '.0f')} samples/s: {_f(None if ratio is None else 100 * ratio, '.0f', ' %')}",
                    ">= 90 %",
                )
            )
    return rows


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "gpu-check")
    rows = loader_rows(out) + step_rows(out) + retrieval_rows(out) + pipeline_rows(out)
    print("| what | measured | bar |")
    print("|---|---|---|")
    for what, measured, bar in rows:
        print(f"| {what} | {measured} | {bar} |")
    parts = (out / "parts.txt").read_text().split("\n") if (out / "parts.txt").is_file() else []
    failed = [p for p in parts if p.strip() and not p.rstrip().endswith(" ok")]
    print()
    print(
        "parts: "
        + "; ".join(
            f"{p.split()[0]} {p.split()[1]} s" + ("" if p.endswith(" ok") else " " + " ".join(p.split()[2:]))
            for p in parts
            if p.strip()
        )
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
