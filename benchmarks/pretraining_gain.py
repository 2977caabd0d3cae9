"""What ALBEF pretraining buys each downstream task: every task finetuned and evaluated twice with the
pipeline's own settings, once from the pretrained model (``models/pretrain``, as ``dvc repro`` does) and once
from the same encoders without vision-language pretraining (the unimodal warm start only: ``pretrain.init_bert`` /
``init_deit`` packed as a pretraining export, :func:`unimodal_export`), next to each metric's chance level.

Run it in a project where ``dvc repro`` has produced ``models/pretrain`` and ``models/unimodal``:

    python benchmarks/pretraining_gain.py                      # every task, results under runs/pretraining_gain
    python benchmarks/pretraining_gain.py --tasks ve nlvr      # a subset
    python benchmarks/pretraining_gain.py --reuse-pipeline     # take the "pretrained" side from metrics/*.json

NLVR2 "with pretraining" includes the text-assignment stage (``pretrain_nlvr``) before finetuning, as the
pipeline does; "without" starts the two-image model straight from the unimodal encoders. MLflow tracking is
off for these runs. Prints a markdown table and writes ``gain.json`` next to the runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from albef.config import read_params
from albef.stages import tracked_evaluate, tracked_train

TASKS = ("retrieval", "vqa", "ve", "nlvr")
# task -> (finetune section, pipeline metrics file, headline metrics); evaluation reads its task's section
LAYOUT = {
    "retrieval": ("finetune_retrieval", "metrics/retrieval.json", ("txt_r1", "img_r1", "r_mean")),
    "vqa": ("finetune_vqa", "metrics/vqa.json", ("accuracy",)),
    "ve": ("finetune_ve", "metrics/ve.json", ("accuracy",)),
    "nlvr": ("finetune_nlvr", "metrics/nlvr.json", ("accuracy",)),
}


def _redirect(section: dict[str, Any], root: Path, name: str) -> dict[str, Any]:
    """The section with every output moved under ``root`` so the pipeline's own outputs stay untouched."""
    out = dict(section)
    out.update(
        out=str(root / "models" / name),
        run_dir=str(root / "runs" / name),
        metrics=str(root / "metrics" / f"train_{name}.json"),
        plots=str(root / "plots" / name),
        resume="never",
    )
    return out


def unimodal_export(params: dict[str, Any], root: Path) -> Path:
    """An albef pretraining folder holding the very encoders ALBEF pretraining starts from (``pretrain.init_bert``
    / ``init_deit``) and nothing learnt from image-text pairs: every task loads it with its own key remapping
    (NLVR2's duplicated fusion layers, the VQA decoder), exactly as it loads ``models/pretrain``."""
    from albef.checkpoint import build_model, save_pretrained
    from albef.config import ModelConfig
    from albef.pretrained import init_from_pretrained

    out = root / "models" / "unimodal_init"
    if not (out / "config.json").exists():
        model = build_model("pretrain", ModelConfig.from_dict(params["model"], prefix="model"))
        init_from_pretrained(model, params["pretrain"]["init_bert"], params["pretrain"]["init_deit"])
        save_pretrained(model, out, task="pretrain")
    return out


def run_side(params: dict[str, Any], task: str, pretrained: bool, root: Path) -> dict[str, Any]:
    """Finetune and evaluate ``task`` from the pretrained model or from the unimodal encoders only."""
    finetune = LAYOUT[task][0]
    side = "pretrained" if pretrained else "no_pretraining"
    p = copy.deepcopy(params)
    p.pop("mlflow", None)
    name = f"{task}_{side}"
    section = _redirect(p[finetune], root, name)
    if pretrained and task == "nlvr":  # text-assignment pretraining first, from the pretrained model
        p["pretrain_nlvr"] = _redirect(p["pretrain_nlvr"], root, f"nlvr_ta_{side}")
        tracked_train(p, "pretrain_nlvr", "nlvr_ta", progress=True)
        section["init"] = p["pretrain_nlvr"]["out"]
    elif not pretrained:
        section.update(init=str(unimodal_export(p, root)))
    p[finetune] = section
    start = time.perf_counter()
    tracked_train(p, finetune, task, progress=True)
    metrics_path = root / "metrics" / f"{name}.json"
    metrics = tracked_evaluate(
        p, section["out"], str(root / "reports" / name), str(metrics_path), progress=True, task=task
    )
    metrics["wall_seconds"] = round(time.perf_counter() - start, 1)
    return metrics


def chance(task: str, metrics: dict[str, Any], params: dict[str, Any]) -> dict[str, float]:
    """What a model that ignores the image (or guesses) reaches on the same test split."""
    if task == "retrieval":
        return {"txt_r1": metrics["chance_r1"]["txt"], "img_r1": metrics["chance_r1"]["img"]}
    if task == "vqa":  # always answer the most frequent training answer
        from albef.eval.vqa import score_predictions

        ev, ft = params["evaluate_vqa"], params["finetune_vqa"]
        data = Path(ev["data_dir"])
        train = json.loads((data / ft["train_file"]).read_text())
        common = Counter(a for r in train for a in r["answer"]).most_common(1)[0][0]
        test = json.loads((data / ev["test_file"]).read_text())
        human = json.loads((data / ev["test_answers"]).read_text())
        guesses = [{"question_id": r["question_id"], "answer": common} for r in test]
        return {"accuracy": score_predictions(guesses, human)["accuracy"]}
    return {"accuracy": metrics["majority_baseline"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--out", default="runs/pretraining_gain")
    parser.add_argument(
        "--reuse-pipeline",
        action="store_true",
        help="read the pretrained side from the pipeline's metrics/*.json instead of training it again",
    )
    args = parser.parse_args()
    params = read_params(args.params)
    root = Path(args.out)
    saved = root / "gain.json"  # tasks measured before (a run for a subset adds to them)
    results: dict[str, Any] = json.loads(saved.read_text()) if saved.exists() else {}
    for task in args.tasks:
        pipeline_metrics = Path(LAYOUT[task][1])
        if args.reuse_pipeline and pipeline_metrics.exists():
            with_pre = json.loads(pipeline_metrics.read_text())
        else:
            with_pre = run_side(params, task, True, root)
        without = run_side(params, task, False, root)
        results[task] = {
            "pretrained": {k: with_pre.get(k) for k in LAYOUT[task][2]},
            "no_pretraining": {k: without.get(k) for k in LAYOUT[task][2]},
            "chance": chance(task, with_pre, params),
            "seconds": {
                "pretrained": with_pre.get("wall_seconds"),
                "no_pretraining": without["wall_seconds"],
            },
        }
        root.mkdir(parents=True, exist_ok=True)
        (root / "gain.json").write_text(json.dumps(results, indent=2) + "\n")  # kept as each task ends
    print("| task | metric | chance | without pretraining | with pretraining |")
    print("|---|---|---|---|---|")
    for task, r in sorted(results.items(), key=lambda item: TASKS.index(item[0])):
        for metric in LAYOUT[task][2]:
            print(
                f"| {task} | {metric} | {r['chance'].get(metric, '')} | {r['no_pretraining'][metric]} "
                f"| {r['pretrained'][metric]} |"
            )


if __name__ == "__main__":
    main()
