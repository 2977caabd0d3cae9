"""Run every stage of ``dvc.yaml`` in order, without DVC, under a profile; time each stage and print a table
of wall times and headline metrics.

For a machine that has albef's model dependencies but not DVC, MLflow or Prefect (the bare GPU machine of
``benchmarks/gpu_check.sh``): the stage commands are read from ``dvc.yaml`` and run as ``python -m albef ...``
in a work folder that holds the profiled ``params.yaml`` and every output, so the checkout is not touched.
MLflow tracking is switched off and the ``register*`` stages (which need the MLflow registry) are skipped.
With DVC at hand the same run is ``dvc exp run $(albef profile gpu)``.

    python benchmarks/pipeline_run.py --profile gpu --json gpu-profile.json      # ~10 min on one H200
    python benchmarks/pipeline_run.py --profile smoke                            # every stage, tiny, on CPU
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from albef.config import read_params  # noqa: E402
from albef.profiles import apply_profile, load_profile  # noqa: E402

# The metric each metrics file is judged by (nested keys with dots), in the order a reader looks for them.
HEADLINES = (
    "r_mean",
    "txt_r1",
    "img_r1",
    "accuracy",
    "image_heldout_label_accuracy",
    "text_heldout_mlm_accuracy",
    "records_kept",
    "loss",
    "samples_per_s",
    "val.r_mean",
)


def stage_commands(dvc_yaml: Path) -> list[tuple[str, str, list[str]]]:
    """``(stage, command, metrics files)`` for every stage of ``dvc.yaml``, in its order."""
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    out = []
    for name, stage in stages.items():
        metrics = []
        for item in stage.get("metrics") or []:
            metrics.extend(item if isinstance(item, dict) else [item])
        out.append((name, " ".join(str(stage["cmd"]).split()), metrics))
    return out


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    found = {}
    for key in HEADLINES:
        node: Any = metrics
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            found[key] = round(float(node), 4)
    return found


def _run_in_process(argv: list[str], work: Path) -> int:
    """``albef <argv>`` in this interpreter, from ``work``: no interpreter start and torch import per stage
    (about 5-10 s each on a small CPU), for the smoke run; output goes to this process's stdout."""
    from albef.cli import main as albef_main

    here = Path.cwd()
    os.chdir(work)
    try:
        return albef_main(argv)
    finally:
        os.chdir(here)


def run_stage(name: str, cmd: str, work: Path, log_path: Path, in_process: bool = False) -> int:
    """The albef command ``cmd`` of dvc.yaml's stage ``name``, run from ``work`` as ``python -m albef`` with its
    output in ``log_path`` (or in this interpreter, ``in_process``); its exit code."""
    argv = shlex.split(cmd)
    if argv[0] != "albef":
        raise SystemExit(f"{name}: expected an albef command, got {cmd!r}")
    if in_process:
        return _run_in_process(argv[1:], work)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        return subprocess.run(
            [sys.executable, "-m", "albef", *argv[1:]],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        ).returncode


def run(args: argparse.Namespace) -> int:
    params = read_params(REPO / "params.yaml")
    if args.profile != "none":
        params = apply_profile(params, load_profile(args.profile))
    params.setdefault("mlflow", {})["enabled"] = False  # no tracking server on the machines this is for
    work = Path(args.work or tempfile.mkdtemp(prefix=f"albef-{args.profile}-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / "logs").mkdir(exist_ok=True)

    stages = [
        s
        for s in stage_commands(REPO / "dvc.yaml")
        if not any(fnmatch.fnmatchcase(s[0], p) for p in args.skip.split(","))
    ]
    print(f"profile {args.profile}: {len(stages)} stages in {work}", flush=True)
    rows = []
    started = time.perf_counter()
    for i, (name, cmd, metric_files) in enumerate(stages, 1):
        log_path = work / "logs" / f"{name}.log"
        t0 = time.perf_counter()
        returncode = run_stage(name, cmd, work, log_path, args.in_process)
        seconds = time.perf_counter() - t0
        if returncode != 0:
            tail = log_path.read_text().splitlines()[-30:] if log_path.is_file() else []
            print(f"[{i}/{len(stages)}] {name} FAILED after {seconds:.1f} s:\n" + "\n".join(tail), flush=True)
            return 1
        results: dict[str, float] = {}
        for rel in metric_files:
            path = work / rel
            if path.is_file():
                results.update(headline(json.loads(path.read_text())))
        rows.append({"stage": name, "seconds": round(seconds, 1), "metrics": results})
        if args.json:  # after every stage: a run stopped by a time limit still leaves what it did
            _write(args, rows, time.perf_counter() - started, work, finished=False)
        shown = ", ".join(f"{k} {v:g}" for k, v in results.items())
        print(f"[{i}/{len(stages)}] {name:<28} {seconds:7.1f} s  {shown}", flush=True)
    total = time.perf_counter() - started
    print(f"whole pipeline: {total:.1f} s ({total / 60:.1f} min)", flush=True)
    if args.json:
        _write(args, rows, total, work, finished=True)
    return 0


def _write(args: argparse.Namespace, rows: list, seconds: float, work: Path, finished: bool) -> None:
    """The run's record: what ran where and when, each stage's time and headline metrics, and (once finished)
    every task's row of ``albef report``; benchmarks/readme_results.py renders the README's figures from it."""
    from dataclasses import asdict

    from albef.report import TASKS, summarise

    payload = {
        "profile": args.profile,
        "finished": finished,
        "seconds": round(seconds, 1),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": _machine(),
        "command": "python benchmarks/pipeline_run.py " + " ".join(shlex.quote(a) for a in args.argv),
        "commit": _commit(),
        "stages": rows,
        "tasks": [asdict(row) for row in summarise(work)] if finished else [],
        # each task's metrics file as the evaluation wrote it (what the README's targets are checked against)
        "task_metrics": {
            t.name: json.loads((work / t.metrics).read_text()) for t in TASKS if (work / t.metrics).is_file()
        },
        "work": str(work),
    }
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


def _machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def _commit() -> str | None:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() or None if result.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="gpu", help="gpu | smoke | none | a YAML profile file")
    parser.add_argument(
        "--work", help="folder for params.yaml, data, models and logs (default: a new temp dir)"
    )
    parser.add_argument("--skip", default="register*", help="comma-separated stage patterns to leave out")
    parser.add_argument("--json", help="also write the stage times and metrics here")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every stage in this interpreter instead of one process per stage (faster; for smoke runs)",
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
