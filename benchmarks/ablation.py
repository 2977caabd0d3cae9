"""The paper's loss ablation (ALBEF Table 1) on this project's data: each row pretrains with a set of loss
switches and finetunes and evaluates the downstream tasks, over several seeds; writes a table (mean, seed
spread) and a plot, and says row by row whether the paper's ordering holds here beyond the seed-to-seed spread.

Rows (each adds one thing to the row before; the switches are the ``pretrain`` / ``finetune_*`` keys of
params.yaml, :class:`albef.config.LossSwitches`):

    mlm_itm        MLM + ITM, random ITM negatives, no ITC, no distillation
    itc            + ITC
    hard_neg       + ITM negatives drawn by ITC similarity (the paper's ITM_hard)
    mod_pretrain   + momentum distillation in pretraining (ITC and MLM targets)
    mod_finetune   + momentum distillation in finetuning: the full model, params.yaml's defaults

The data (``synth``, ``preprocess``) and the unimodal encoders (``unimodal``) are shared by every run: they are
taken from the project (after ``dvc repro unimodal``) or, when it has none, made once under ``--work``. Each
(row, seed) then runs the stage commands of dvc.yaml from ``pretrain`` on, as ``dvc repro`` runs them, in a folder
of its own (MLflow off); the seed replaces every training stage's ``seed``. A finished (row, seed) is kept and
skipped on the next invocation, and so is each finished stage of an unfinished one, so an interrupted ablation
continues where it stopped. The ``mod_finetune`` row reuses ``mod_pretrain``'s pretraining of the same seed
(the same switches: only the finetuning differs).

    dvc repro unimodal && python benchmarks/ablation.py                      # 5 rows x 3 seeds, every task
    python benchmarks/ablation.py --tasks retrieval --seeds 0 1 2           # zero-shot, finetuned, shifted only
    python benchmarks/ablation.py --profile smoke --seeds 0 1 --in-process  # a check that it runs (minutes)
    python benchmarks/ablation.py --readme README.md                        # the table into the README
    python benchmarks/ablation.py --collect --readme README.md              # the finished runs only, now
    python benchmarks/ablation.py --readme README.md --record benchmarks/results/ablation.json  # the README's

Writes ``ablation.json`` (every run's metrics and the summary), ``ablation.md`` and ``ablation.png`` under
``--work`` (default ``runs/ablation``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_run import run_stage, stage_commands  # noqa: E402
from readme_results import replace_block  # noqa: E402

from albef.config import read_params  # noqa: E402
from albef.profiles import apply_profile, load_profile  # noqa: E402

FINETUNE_SECTIONS = (
    "finetune_retrieval",
    "finetune_vqa",
    "finetune_ve",
    "finetune_nlvr",
    "finetune_grounding",
)
TRAIN_SECTIONS = ("pretrain", "pretrain_nlvr", *FINETUNE_SECTIONS)

# The rows of ALBEF Table 1: each adds its switches to the row before, from everything off (MLM and ITM alone).
_STEPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("mlm_itm", "MLM + ITM", ()),
    ("itc", "+ ITC", ("itc",)),
    ("hard_neg", "+ ITM hard negatives", ("itm_hard_negatives",)),
    ("mod_pretrain", "+ MoD in pretraining", ("mod_itc", "mod_mlm")),
    ("mod_finetune", "+ MoD in finetuning (full)", ("finetune_mod",)),
)


def _rows() -> dict[str, tuple[str, dict[str, bool]]]:
    """row -> (label, every switch's value): each row sets all of them, so rows do not depend on params.yaml."""
    switches = dict.fromkeys(("itc", "itm_hard_negatives", "mod_itc", "mod_mlm", "finetune_mod"), False)
    rows = {}
    for name, label, added in _STEPS:
        switches = {**switches, **dict.fromkeys(added, True)}
        rows[name] = (label, switches)
    return rows


ROWS = _rows()

# task -> (the dvc.yaml stages it runs after pretrain, its metrics: (column, file, key))
TASKS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str, str], ...]]] = {
    "retrieval": (
        ("evaluate_zeroshot", "finetune_retrieval", "evaluate_retrieval", "evaluate_zeroshot_shifted"),
        (
            ("zero-shot TR@1", "metrics/zeroshot.json", "txt_r1"),
            ("zero-shot IR@1", "metrics/zeroshot.json", "img_r1"),
            ("retrieval TR@1", "metrics/retrieval.json", "txt_r1"),
            ("retrieval IR@1", "metrics/retrieval.json", "img_r1"),
            ("retrieval r_mean", "metrics/retrieval.json", "r_mean"),
            ("shifted r_mean", "metrics/zeroshot_shifted.json", "r_mean"),
        ),
    ),
    "vqa": (("finetune_vqa", "evaluate_vqa"), (("VQA", "metrics/vqa.json", "accuracy"),)),
    "ve": (("finetune_ve", "evaluate_ve"), (("SNLI-VE", "metrics/ve.json", "accuracy"),)),
    "nlvr": (
        ("pretrain_nlvr", "finetune_nlvr", "evaluate_nlvr"),
        (("NLVR2", "metrics/nlvr.json", "accuracy"),),
    ),
}
SHARED_STAGES = ("synth", "preprocess", "unimodal")
SHARED_OUTPUTS = ("data", "models/unimodal")


def row_overrides(row: str, seed: int) -> dict[str, Any]:
    """The ``section.key`` overrides of one (row, seed)."""
    switches = dict(ROWS[row][1])
    finetune_mod = switches.pop("finetune_mod")
    out: dict[str, Any] = {f"pretrain.{key}": value for key, value in switches.items()}
    out.update({f"{section}.mod": finetune_mod for section in FINETUNE_SECTIONS})
    out.update({f"{section}.seed": seed for section in TRAIN_SECTIONS})
    return out


def _set(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(params)
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        if section not in out:
            continue  # a project without that task (its stages are not run either)
        out[section][key] = value
    return out


def _run_stage(name: str, cmd: str, work: Path, in_process: bool) -> None:
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)  # also the stage markers' folder
    code = run_stage(name, cmd, work, log, in_process)
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:]) if log.is_file() else ""
        raise SystemExit(f"{work.name}: stage {name} failed (exit {code}); log {log}\n{tail}")


def shared_inputs(project: Path, params: dict[str, Any], work: Path, in_process: bool) -> Path:
    """The folder holding ``data/`` and ``models/unimodal`` every run starts from: the project when it has
    them, else ``work/shared`` after running the data and unimodal stages there once."""
    if all((project / rel).exists() for rel in ("data/processed", "models/unimodal")):
        return project
    base = work / "shared"
    base.mkdir(parents=True, exist_ok=True)
    (base / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commands = {name: cmd for name, cmd, _ in stage_commands(REPO / "dvc.yaml")}
    for stage in SHARED_STAGES:
        done = base / "logs" / f"{stage}.done"
        if not done.exists():
            print(f"shared: {stage}", flush=True)
            _run_stage(stage, commands[stage], base, in_process)
            done.write_text("")
    return base


def _pretrain_switches(row: str) -> dict[str, bool]:
    return {k: v for k, v in row_overrides(row, 0).items() if k.startswith("pretrain.")}


def shared_pretraining(row: str, seed: int, work: Path) -> Path | None:
    """A finished pretraining of an earlier row with the same pretraining switches and seed (the
    ``mod_finetune`` row pretrains exactly as ``mod_pretrain``): its model is reused, not trained again."""
    for other in ROWS:
        if other == row:
            return None
        folder = work / other / f"seed{seed}"
        if _pretrain_switches(other) == _pretrain_switches(row) and (folder / "logs/pretrain.done").exists():
            return folder / "models" / "pretrain"
    return None


def run_one(
    row: str, seed: int, params: dict[str, Any], tasks: list[str], shared: Path, work: Path, in_process: bool
) -> dict[str, Any]:
    """Pretrain with the row's switches and ``seed``, then every task's stages; the metrics by column. A
    stage that finished (``logs/<stage>.done``) is not run again when an interrupted run is continued with
    the same params."""
    folder = work / row / f"seed{seed}"
    result_file = folder / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    run_params = _set(params, row_overrides(row, seed))
    params_text = yaml.safe_dump(run_params, sort_keys=False)
    params_file = folder / "params.yaml"
    if not params_file.is_file() or params_file.read_text() != params_text:
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "models").mkdir(parents=True)
        for rel in SHARED_OUTPUTS:
            (folder / rel).symlink_to((shared / rel).resolve(), target_is_directory=True)
        params_file.write_text(params_text)
    commands = {name: cmd for name, cmd, _ in stage_commands(REPO / "dvc.yaml")}
    stages = ["pretrain"] + [s for task in tasks for s in TASKS[task][0] if s in commands]
    pretrained = shared_pretraining(row, seed, work)
    if pretrained is not None and not (folder / "models/pretrain").exists():
        (folder / "models/pretrain").symlink_to(pretrained.resolve(), target_is_directory=True)
    seconds = 0.0  # the stages' own time (each marker holds its stage's), also across interruptions
    for stage in stages:
        done = folder / "logs" / f"{stage}.done"
        if stage == "pretrain" and pretrained is not None:
            continue
        if not done.exists():
            started = time.perf_counter()
            _run_stage(stage, commands[stage], folder, in_process)
            done.write_text(f"{time.perf_counter() - started:.1f}")
        seconds += float(done.read_text() or 0)
    metrics: dict[str, float] = {}
    for task in tasks:
        for column, rel, key in TASKS[task][1]:
            path = folder / rel
            if path.is_file():
                metrics[column] = float(json.loads(path.read_text())[key])
    result = {
        "row": row,
        "seed": seed,
        "seconds": round(seconds, 1),
        "metrics": metrics,
    }
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def summarise(results: list[dict[str, Any]], rows: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """row -> column -> {mean, std (sample), min, max, n} over the seeds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        runs = [r for r in results if r["row"] == row]
        columns = sorted({c for r in runs for c in r["metrics"]})
        out[row] = {}
        for column in columns:
            values = [r["metrics"][column] for r in runs if column in r["metrics"]]
            out[row][column] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
                "n": len(values),
            }
    return out


def verdict(before: dict[str, float], after: dict[str, float]) -> str:
    """Whether adding a row's component moved a metric beyond the seed-to-seed spread: ``better`` / ``worse``
    when the means differ by more than the larger of the two rows' standard deviations (and the seed ranges
    do not overlap), ``within noise`` otherwise; ``one seed`` when a row has a single seed (no spread to
    compare with)."""
    if min(before["n"], after["n"]) < 2:
        return "one seed"
    delta = after["mean"] - before["mean"]
    spread = max(before["std"], after["std"])
    separated = after["min"] > before["max"] or after["max"] < before["min"]
    if abs(delta) > spread and separated:
        return "better" if delta > 0 else "worse"
    return "within noise"


def table(summary: dict[str, dict[str, dict[str, float]]], rows: list[str]) -> str:
    """Markdown: one line per row, mean ± std per column, and the change from the row above with its verdict."""
    columns = sorted({c for row in rows for c in summary[row]}, key=_column_order)
    lines = [
        "| row | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for i, row in enumerate(rows):
        cells = []
        for column in columns:
            stat = summary[row].get(column)
            if stat is None:
                cells.append("")
                continue
            cell = f"{stat['mean']:.1f} ± {stat['std']:.1f}"
            if i > 0 and column in summary[rows[i - 1]]:
                before = summary[rows[i - 1]][column]
                cell += f" ({stat['mean'] - before['mean']:+.1f}, {verdict(before, stat)})"
            cells.append(cell)
        seeds = max((stat["n"] for stat in summary[row].values()), default=0)
        lines.append(f"| {ROWS[row][0]} ({seeds} seed{'s' * (seeds != 1)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _column_order(column: str) -> int:
    order = [c for task in TASKS.values() for c, _, _ in task[1]]
    return order.index(column) if column in order else len(order)


def plot(
    summary: dict[str, dict[str, dict[str, float]]], results: list[dict[str, Any]], rows: list[str], out: Path
):
    """One panel per metric: each row's mean with a ±std bar and every seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = sorted({c for row in rows for c in summary[row]}, key=_column_order)
    ncols = min(4, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    for ax, column in zip(axes.flat, columns):
        xs = list(range(len(rows)))
        means = [summary[r].get(column, {}).get("mean", float("nan")) for r in rows]
        stds = [summary[r].get(column, {}).get("std", 0.0) for r in rows]
        ax.bar(xs, means, yerr=stds, color="#8fb3d9", capsize=3)
        for x, row in zip(xs, rows):
            seeds = [r["metrics"][column] for r in results if r["row"] == row and column in r["metrics"]]
            ax.plot([x] * len(seeds), seeds, "k.", markersize=4)
        ax.set_title(column, fontsize=9)
        ax.set_xticks(xs, [ROWS[r][0] for r in rows], rotation=35, ha="right", fontsize=7)
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    fig.suptitle("ALBEF loss ablation (mean ± std over seeds; dots: seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


README_BEGIN = "<!-- ablation:begin (generated by benchmarks/ablation.py --readme; do not edit) -->"
README_END = "<!-- ablation:end -->"


def readme_block(report: dict[str, Any]) -> str:
    """The README's ablation section: the command, when and where it ran, the table."""
    return "\n".join(
        [
            README_BEGIN,
            f"Measured {report['date']} on {report['machine']}: `{report['command']}` "
            f"({len(report['seeds'])} seeds: {', '.join(map(str, report['seeds']))}; "
            f"{report['seconds'] / 60:.0f} min of runs). Each cell: mean ± std over the seeds, then the change from the "
            "row above and whether it exceeds the seed-to-seed spread."
            + (
                f" Not finished yet, so not in the table: {', '.join(report['missing'])}."
                if report.get("missing")
                else ""
            ),
            "",
            report["table"],
            *(["", f"![the ablation, one panel per metric]({report['plot']})"] if report.get("plot") else []),
            README_END,
        ]
    )


def write_readme(readme: Path, report: dict[str, Any]) -> None:
    replace_block(readme, README_BEGIN, README_END, readme_block(report), "ablation")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--project", default=str(REPO), help="the project whose params.yaml and data are used"
    )
    parser.add_argument(
        "--work", default=None, help="where runs and results go (default: <project>/runs/ablation)"
    )
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--profile", default="none", help="gpu | smoke | none | a YAML profile file")
    parser.add_argument("--in-process", action="store_true", help="every stage in this interpreter (faster)")
    parser.add_argument("--readme", help="also write the table into this README's ablation block")
    parser.add_argument(
        "--record",
        help="also copy ablation.json (and ablation.png beside it) here: the README's block is checked against it",
    )
    parser.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: summarise the (row, seed) runs already finished under --work (while an ablation runs)",
    )
    args = parser.parse_args(argv)

    project = Path(args.project).resolve()
    work = Path(args.work).resolve() if args.work else project / "runs" / "ablation"
    work.mkdir(parents=True, exist_ok=True)
    params = read_params(project / "params.yaml")
    if args.profile != "none":
        params = apply_profile(params, load_profile(args.profile))
    params.setdefault("mlflow", {})["enabled"] = False
    for row in args.rows:  # a bad row fails now, not after an hour of the rows before it
        _set(params, row_overrides(row, 0))

    shared = None if args.collect else shared_inputs(project, params, work, args.in_process)
    results = []
    missing = []
    total = len(args.rows) * len(args.seeds)
    for row in args.rows:
        for seed in args.seeds:
            if args.collect:
                finished = work / row / f"seed{seed}" / "result.json"
                if not finished.is_file():
                    missing.append(f"{row} seed {seed}")
                    continue
                result = json.loads(finished.read_text())
            else:
                result = run_one(row, seed, params, args.tasks, shared, work, args.in_process)
            results.append(result)
            shown = ", ".join(f"{k} {v:.1f}" for k, v in result["metrics"].items())
            print(
                f"[{len(results)}/{total}] {row} seed {seed} ({result['seconds']:.0f} s): {shown}", flush=True
            )

    rows = [row for row in args.rows if any(r["row"] == row for r in results)]
    if not rows:
        raise SystemExit(f"no finished run under {work}")
    summary = summarise(results, rows)
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores" + _gpu_name(),
        "command": run_command(args),
        "rows": rows,
        "missing": missing,
        "seeds": args.seeds,
        "tasks": args.tasks,
        "profile": args.profile,
        "seconds": round(sum(r["seconds"] for r in results), 1),  # the runs' own time, also when resumed
        "runs": results,
        "summary": summary,
    }
    report["table"] = table(summary, rows)
    # the plot the README shows: the one copied beside the record (a path from where the command runs)
    report["plot"] = str(Path(args.record).with_suffix(".png")) if args.record else None
    (work / "ablation.json").write_text(json.dumps(report, indent=2) + "\n")
    (work / "ablation.md").write_text(readme_block(report) + "\n")
    plot(summary, results, rows, work / "ablation.png")
    print(report["table"])
    print(f"written: {work / 'ablation.json'}, {work / 'ablation.md'}, {work / 'ablation.png'}")
    if args.record:
        record = Path(args.record)
        record.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "ablation.json", record)
        shutil.copyfile(work / "ablation.png", record.with_suffix(".png"))
    if args.readme:
        write_readme(Path(args.readme), report)
    return 0


def run_command(args: argparse.Namespace) -> str:
    """The command that makes these runs (also when they are collected with ``--collect``): the rows, seeds,
    tasks and profile, not where the results go."""
    parts = ["python benchmarks/ablation.py"]
    if args.rows != list(ROWS):
        parts.append("--rows " + " ".join(args.rows))
    parts.append("--seeds " + " ".join(map(str, args.seeds)))
    if args.tasks != list(TASKS):
        parts.append("--tasks " + " ".join(args.tasks))
    if args.profile != "none":
        parts.append(f"--profile {shlex.quote(args.profile)}")
    return " ".join(parts)


def _gpu_name() -> str:
    import torch

    return f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"


if __name__ == "__main__":
    sys.exit(main())
