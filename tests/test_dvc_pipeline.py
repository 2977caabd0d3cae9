"""Plain DVC on the project the Prefect harness's full_pipeline run left behind: the flow ran every stage of
dvc.yaml as `dvc repro <stage>` in a fresh clone on tiny settings, which is what README command 1 does in one go.
Here DVC is asked what a user asks after it: every promised output is there, `dvc metrics show` and `dvc plots
show` read them, `dvc repro` has nothing left to do, and `dvc exp run` with other params is a second MLflow
pipeline run whose model goes through the promotion gate.

(One whole-pipeline run serves both: CI ran the 22 stages twice, once under Prefect and once under `dvc repro`,
about ten minutes of its budget. This module runs last in the harness's group, tests/conftest.py: its experiment
changes the checkout's params and outputs.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from prefect_harness import _dvc, _run

OUTPUTS = (
    "models/pretrain/model.safetensors",
    "models/retrieval/model.safetensors",
    "models/retrieval/tokenizer/tokenizer.json",
    "reports/zeroshot/rankings.json",
    "reports/retrieval/examples.png",
    "plots/pretrain/train.csv",
    "plots/finetune_retrieval/curves.png",
    "models/vqa/answer_list.json",
    "reports/vqa/vqa_result.json",
    "reports/ve/predictions.json",
    "reports/nlvr/predictions.json",
    "models/nlvr_ta/model.safetensors",
    "models/grounding/model.safetensors",
    "reports/grounding/results.json",
    "reports/zeroshot_shifted/rankings.json",
)


def test_the_pipeline_left_every_output_and_dvc_reads_them(project: Path, prefect, full_pipeline_run):
    assert full_pipeline_run.state.type.value == "COMPLETED", full_pipeline_run.state.message
    for path in OUTPUTS:
        assert (project / path).is_file(), path
    retrieval = json.loads((project / "metrics" / "retrieval.json").read_text())
    assert {"txt_r1", "img_r1", "r_mean", "itc"} <= set(retrieval) and retrieval["images"] == 4
    assert json.loads((project / "metrics" / "pretrain.json").read_text())["steps"] == 32 // 4
    summary = json.loads((project / "metrics" / "summary.json").read_text())  # the last stage: one screen
    assert (
        summary["retrieval (finetuned)"]["champion"].startswith("v")
        and summary["SNLI-VE"]["value"] is not None
    )
    for task in ("vqa", "ve", "nlvr", "grounding"):  # every downstream model is registered, gated on accuracy
        outcome = json.loads((project / "metrics" / f"register_{task}.json").read_text())
        assert outcome["model_name"] == f"albef-{task}" and outcome["gate_metric"] == "accuracy", outcome
        assert outcome["version"] >= 1 and outcome["registered"], outcome
    shown = json.loads(_dvc(project, prefect, "metrics", "show", "--json"))
    assert "metrics/retrieval.json" in json.dumps(shown)
    _dvc(project, prefect, "plots", "show", "-o", str(project / "plots_html"))
    assert (project / "plots_html" / "index.html").is_file()
    assert "up to date" in _dvc(project, prefect, "repro").lower()


def _mlflow_state(project: Path) -> dict:
    """Pipeline parent runs (newest last), the newest one's stage runs and the retrieval registry's versions."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = yaml.safe_load((project / "params.yaml").read_text())["mlflow"]["experiment"]
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = sorted(
        (r for r in runs if r.data.tags.get("albef.kind") == "pipeline"), key=lambda r: r.info.start_time
    )
    newest = parents[-1].info.run_id
    versions = client.search_model_versions("name = 'albef-retrieval'")
    return {
        "parents": [p.info.run_id for p in parents],
        "stages": sorted(
            r.data.tags["albef.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == newest
        ),
        "aliases": {
            a: str(v.version) for v in versions for a in client.get_model_version(v.name, v.version).aliases
        },
        "r_mean": {str(v.version): float(v.tags["metric.r_mean"]) for v in versions},
        "decisions": {str(v.version): v.tags.get("promotion_decision") for v in versions},
    }


@pytest.mark.slow
def test_an_experiment_with_other_params_is_a_second_pipeline_run_through_the_gate(
    project: Path, prefect, full_pipeline_run
):
    before = _mlflow_state(project)
    champion = before["aliases"]["champion"]
    finetune_metrics = project / "metrics" / "finetune_retrieval.json"
    one_epoch = json.loads(finetune_metrics.read_text())["steps"]
    _run(["git", "add", "-A"], project, prefect)
    _run(["git", "commit", "-qm", "the tiny pipeline, run by the full_pipeline flow"], project, prefect)
    # (finetuning's epochs: the experiment reruns finetune_retrieval, evaluate_retrieval and register, and leaves
    # pretraining, whose rerun would add a stage's time and nothing else to check)
    _dvc(project, prefect, "exp", "run", "register", "-S", "finetune_retrieval.epochs=2")
    assert json.loads(finetune_metrics.read_text())["steps"] == 2 * one_epoch
    experiments = _dvc(project, prefect, "exp", "show", "--json")
    assert "finetune_retrieval.epochs" in experiments or '"epochs": 2' in experiments

    # other params: a parent run of its own holding the stages DVC re-ran; the new version is challenger, and
    # champion only if the gate let it through
    after = _mlflow_state(project)
    assert len(after["parents"]) == len(before["parents"]) + 1
    assert {"finetune_retrieval", "evaluate_retrieval", "register"} <= set(after["stages"])
    assert "pretrain" not in after["stages"]  # up to date: DVC reran only what the changed param reaches
    new = str(max(int(v) for v in after["r_mean"]))
    assert new not in before["r_mean"] and after["aliases"]["challenger"] == new
    better = after["r_mean"][new] >= before["r_mean"][champion]
    assert after["aliases"]["champion"] == (new if better else champion)
    assert after["decisions"][new] == ("promoted" if better else "rejected")
