"""Learning curves of a pipeline run, beside longer or changed finetunings of the same pretrained model: how
each task moves against its chance level and text-only baseline as training goes on. Where an embedded
default target is out of reach (issue 15), this is the curve that shows it, and what more steps or another
learning rate buy.

    python benchmarks/learning_curves.py --run /tmp/r2 \\
        --extra "VE, 6 epochs, lr 1e-4=/tmp/probe/ve_lr1e4" --extra "VQA, 4 epochs=/tmp/probe/vqa_nomod4" \\
        --record benchmarks/results/learning-curves.json      # the curves' data, and the plot beside it (.png)
    python benchmarks/learning_curves.py --from-record benchmarks/results/learning-curves.json   # redraw

A run is a project folder after ``dvc repro`` (or after one stage run by hand): each training stage logs
``runs/<stage>/history.csv`` (the loss every few steps) and ``runs/<stage>/validation.csv`` (one row per
validation); the evaluations write ``metrics/<task>.json`` with the measured text-only baselines.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

#: training stage -> the history and validation columns kept
STAGES = {
    "pretrain": (("loss_itc", "loss_itm", "loss_mlm"), ("r_mean", "itc_r_mean")),
    "finetune_retrieval": (("loss_itc", "loss_itm"), ("r_mean", "itc_r_mean")),
    "finetune_vqa": (("loss",), ()),
    "finetune_ve": (("loss",), ("accuracy",)),
    "finetune_nlvr": (("loss",), ("accuracy",)),
    "finetune_grounding": (("loss_itc", "loss_itm"), ()),
}
#: evaluation metrics file -> the figures kept (the model's, and its text-only and majority baselines)
METRICS = {
    "vqa": ("accuracy", "question_only_accuracy"),
    "ve": ("accuracy", "hypothesis_only_accuracy", "majority_baseline"),
    "nlvr": ("accuracy", "sentence_only_accuracy", "majority_baseline"),
}
# The ITM loss of a classifier that knows only that one pair in three is positive (ALBEF's batch: a positive,
# a hard negative image and a hard negative text): the entropy of 1/3, where ITM starts.
ITM_PRIOR = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)


def _read_csv(path: Path, columns: tuple[str, ...], x: str) -> dict[str, list[float]]:
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [c for c in columns if rows and c in rows[0]]
    if not kept:
        return {}
    return {column: [round(float(r[column]), 4) for r in rows] for column in (x, *kept)}


def read_run(label: str, path: Path) -> dict[str, Any]:
    """The curves of every training stage the run has, and its evaluations' figures."""
    stages = {}
    for stage, (losses, validation) in STAGES.items():
        curves = {
            "history": _read_csv(path / "runs" / stage / "history.csv", losses, "step"),
            "validation": _read_csv(path / "runs" / stage / "validation.csv", validation, "epoch"),
        }
        if curves["history"]:
            stages[stage] = curves
    metrics = {}
    for task, keys in METRICS.items():
        file = path / "metrics" / f"{task}.json"
        if file.is_file():
            data = json.loads(file.read_text())
            metrics[task] = {k: data[k] for k in keys if data.get(k) is not None}
    if not stages:
        raise SystemExit(f"{path}: no runs/<stage>/history.csv of a training stage ({', '.join(STAGES)})")
    return {"label": label, "path": str(path), "stages": stages, "metrics": metrics}


def _series(record: dict[str, Any], stage: str, part: str, column: str):
    """(label, x, y) of ``column`` for every run that has it."""
    for run in record["runs"]:
        label, curves = run["label"], run["stages"].get(stage, {}).get(part, {})
        if column in curves:
            yield label, curves["step" if part == "history" else "epoch"], curves[column]


def _legend_with_test(record: dict[str, Any], label: str, task: str) -> str:
    run = next(run for run in record["runs"] if run["label"] == label)
    accuracy = run["metrics"].get(task, {}).get("accuracy")
    return label if accuracy is None else f"{label} (test {accuracy:.1f})"


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = record["runs"][0]["metrics"]  # the pipeline run's baselines
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    ax = axes[0, 0]  # the pipeline run's pretraining
    for column in ("loss_itc", "loss_itm", "loss_mlm"):
        for _, x, y in list(_series(record, "pretrain", "history", column))[:1]:
            ax.plot(x, y, label=column.removeprefix("loss_").upper())
    ax.axhline(ITM_PRIOR, color="k", ls="--", lw=1, label=f"ITM prior, 1 positive in 3 ({ITM_PRIOR:.3f})")
    ax.set(title="pretraining losses", xlabel="step", ylabel="loss")

    ax = axes[0, 1]  # pretraining's epochs, then the retrieval finetuning's after them
    pretrained = {label: x[-1] for label, x, _ in _series(record, "pretrain", "validation", "r_mean")}
    for column, what in (("r_mean", "ITM re-ranked"), ("itc_r_mean", "ITC only")):
        for stage, name in (("pretrain", "pretraining"), ("finetune_retrieval", "retrieval finetuning")):
            for label, x, y in _series(record, stage, "validation", column):
                x = [e + (pretrained.get(label, 0) if stage != "pretrain" else 0) for e in x]
                ax.plot(x, y, "-o" if column == "r_mean" else "--s", label=f"{name}, {what}")
    ax.set(
        title="retrieval validation r_mean", xlabel="epoch (pretraining, then finetuning)", ylabel="r_mean"
    )
    ax.set(ylim=(0, 100))

    ax = axes[0, 2]
    for label, x, y in _series(record, "finetune_ve", "validation", "accuracy"):
        ax.plot(x, y, "-o", label=_legend_with_test(record, label, "ve"))
    for key, text in (
        ("hypothesis_only_accuracy", "hypothesis only (test)"),
        ("majority_baseline", "majority"),
    ):
        if key in main.get("ve", {}):
            ax.axhline(
                main["ve"][key], color="k", ls="--" if key != "majority_baseline" else ":", lw=1, label=text
            )
    ax.set(title="SNLI-VE dev accuracy", xlabel="epoch", ylabel="%")

    for ax, stage, chance, title in (
        (axes[1, 0], "finetune_ve", math.log(3), "SNLI-VE training loss"),
        (axes[1, 2], "finetune_nlvr", math.log(2), "NLVR2 training loss"),
    ):
        task = stage.removeprefix("finetune_")
        for label, x, y in _series(record, stage, "history", "loss"):
            ax.plot(x, y, label=_legend_with_test(record, label, task))
        ax.axhline(chance, color="k", ls=":", lw=1, label=f"uniform guess (ln {round(math.exp(chance))})")
        ax.set(title=title, xlabel="step", ylabel="loss")

    ax = axes[1, 1]
    for label, x, y in _series(record, "finetune_vqa", "history", "loss"):
        ax.plot(x, y, label=_legend_with_test(record, label, "vqa"))
    question_only = main.get("vqa", {}).get("question_only_accuracy")
    title = "VQA training loss" + (
        f" (question-only test accuracy {question_only:.1f})" if question_only else ""
    )
    ax.set(title=title, xlabel="step", ylabel="loss")

    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"Learning curves, measured {record['measured']}: {record['machine']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="the pipeline run (a project folder after dvc repro)")
    parser.add_argument(
        "--extra", action="append", default=[], metavar="LABEL=PATH", help="another run to draw beside it"
    )
    parser.add_argument("--label", default="default", help="the pipeline run's label")
    parser.add_argument("--machine", default="2 CPU cores, no GPU", help="where the runs were measured")
    parser.add_argument(
        "--record", type=Path, help="write the curves here (JSON) and the plot beside it (.png)"
    )
    parser.add_argument("--from-record", type=Path, help="redraw the plot of a record (no run is read)")
    args = parser.parse_args(argv)
    if args.from_record:
        record = json.loads(args.from_record.read_text())
        plot(record, args.from_record.with_suffix(".png"))
        print(f"written: {args.from_record.with_suffix('.png')}")
        return 0
    if not args.run or not args.record:
        parser.error("--run and --record are needed (or --from-record)")
    runs = [read_run(args.label, Path(args.run))]
    for extra in args.extra:
        label, sep, path = extra.rpartition("=")
        if not sep or not label:
            parser.error(f"--extra {extra!r}: expected LABEL=PATH")
        runs.append(read_run(label, Path(path)))
    command = "python benchmarks/learning_curves.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    record = {
        "measured": dt.date.today().isoformat(),
        "machine": args.machine,
        "command": command,
        "runs": runs,
    }
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    plot(record, args.record.with_suffix(".png"))
    print(f"written: {args.record}, {args.record.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
