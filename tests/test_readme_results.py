"""The README's figures for the embedded default are the rendering of a measured run's record
(benchmarks/readme_results.py over benchmarks/results/embedded-default.json), and the targets are judged right."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import readme_results  # noqa: E402

RECORD = REPO / "benchmarks" / "results" / "embedded-default.json"


def test_the_readme_block_is_the_rendering_of_the_committed_record():
    record = json.loads(RECORD.read_text())
    assert record["finished"] and record["profile"] == "none", (
        "the README's figures come from a whole default run"
    )
    assert readme_results.readme_block(REPO / "README.md") == readme_results.render(record), (
        "README.md's results block is stale: run benchmarks/readme_results.py "
        "--record benchmarks/results/embedded-default.json --readme README.md"
    )


def _record(**metrics) -> dict:
    tasks = [
        {
            "task": name,
            "metric": "m",
            "value": 1.0,
            "baseline": None,
            "baseline_name": "",
            "champion": "",
            "detail": "",
        }
        for name in metrics
    ]
    return {
        "finished": True,
        "profile": "none",
        "date": "2026-12-05",
        "machine": "2 CPU cores, no GPU",
        "command": "python benchmarks/pipeline_run.py --profile none",
        "commit": "abc1234",
        "seconds": 1000.0,
        "stages": [{"stage": "pretrain", "seconds": 183.2, "metrics": {"loss": 2.5}}],
        "tasks": tasks,
        "task_metrics": metrics,
    }


def test_targets_are_met_or_missed_as_issue_15_states_them():
    target = readme_results._target
    assert target("retrieval (finetuned)", {"txt_r1": 31.0, "img_r1": 20.0})[1] is True
    assert target("retrieval (finetuned)", {"txt_r1": 31.0, "img_r1": 19.9})[1] is False
    chance = {"txt": 0.2, "img": 0.2}
    assert target("zero-shot retrieval", {"txt_r1": 2.0, "img_r1": 2.0, "chance_r1": chance})[1] is True
    assert target("zero-shot retrieval", {"txt_r1": 2.0, "img_r1": 1.9, "chance_r1": chance})[1] is False
    assert target("VQA", {"accuracy": 62.9, "question_only_accuracy": 47.8})[1] is True
    assert target("VQA", {"accuracy": 62.7, "question_only_accuracy": 47.8})[1] is False
    assert target("VQA", {"accuracy": 62.7})[1] is None  # no baseline: not judged
    assert target("SNLI-VE", {"accuracy": 65.6, "hypothesis_only_accuracy": 71.9})[1] is False
    assert target("SNLI-VE", {"accuracy": 61.0, "hypothesis_only_accuracy": 40.0})[1] is True
    assert target("NLVR2", {"accuracy": 65.0})[1] is True
    assert target("grounding (Grad-CAM)", {"accuracy": 17.2})[1] is False
    assert target("NLVR2", None)[1] is None


def test_the_rendering_shows_each_task_its_target_and_the_time_budget(tmp_path):
    record = _record(**{"NLVR2": {"accuracy": 70.0}, "grounding (Grad-CAM)": {"accuracy": 12.0}})
    block = readme_results.render(record)
    assert "| NLVR2 | m | 1.0 () | - | ≥ 65 | yes |" in block
    assert "| ≥ 30 | **no** |" in block
    assert "Whole run: 16.7 min (1000 s; target ≤ 15 min: **no**)" in block
    assert "| `pretrain` | 183 | loss 2.5 |" in block
    assert "Measured 2026-12-05 on 2 CPU cores, no GPU, commit abc1234" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{readme_results.BEGIN}\nold\n{readme_results.END}\nb\n")
    readme_results.write_readme(readme, block)
    assert readme.read_text() == f"a\n{block}\nb\n" and readme_results.readme_block(readme) == block
    with pytest.raises(SystemExit, match="unfinished"):
        readme_results.render({**record, "finished": False})


def test_reproducibility_compares_weights_byte_for_byte_and_metrics_without_timing(tmp_path):
    """benchmarks/reproducibility.py: two runs are the same when their data, weights and metrics are, whatever
    their wall times; one changed byte of a weight file or one changed metric makes them differ."""
    import reproducibility

    def run(name: str, weight: bytes, loss: float, seconds: float) -> Path:
        work = tmp_path / name
        (work / "models" / "pretrain").mkdir(parents=True)
        (work / "data").mkdir()
        (work / "metrics").mkdir()
        (work / "models" / "pretrain" / "model.safetensors").write_bytes(weight)
        training = {"steps": 3, "train_seconds": seconds}  # the exported model's training record
        (work / "models" / "pretrain" / "training.json").write_text(json.dumps(training))
        (work / "data" / "pretrain.json").write_text("[]")
        (work / "data" / ".processed.state").mkdir()  # restart bookkeeping, which names its run's folder
        (work / "data" / ".processed.state" / "done.json").write_text(json.dumps({"root": str(work)}))
        metrics = {"loss": loss, "train_seconds": seconds, "samples_per_s": 1 / seconds, "val": {"r_mean": 7}}
        (work / "metrics" / "pretrain.json").write_text(json.dumps(metrics))
        return work

    a = run("a", b"\x00\x01", 0.5, 10.0)
    assert reproducibility.main([str(a), str(run("b", b"\x00\x01", 0.5, 12.5))]) == 0
    result = reproducibility.compare(a, run("c", b"\x00\x02", 0.5, 10.0))
    assert result["different"] == ["models/pretrain/model.safetensors"] and result["weights_compared"] == 1
    assert reproducibility.compare(a, run("d", b"\x00\x01", 0.6, 10.0))["different"] == [
        "metrics/pretrain.json"
    ]
    assert reproducibility.main([str(a), str(tmp_path / "missing")]) == 1


def test_the_fusion_probe_separates_what_is_linearly_separable_and_not_noise():
    import fusion_probe

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=gen)
    centres = torch.randn(3, 16, generator=gen) * 3
    features = centres[labels] + torch.randn(300, 16, generator=gen)
    _, held = fusion_probe.logistic_regression(
        features[:200], labels[:200], features[200:], labels[200:], 0.0
    )
    assert held > 0.9
    noise = torch.randn(300, 16, generator=gen)
    _, held = fusion_probe.logistic_regression(noise[:200], labels[:200], noise[200:], labels[200:], 1e-2)
    assert held < 0.5


def _fake_run(root: Path, ve_dev: list[float], vqa_test: float | None = None) -> Path:
    """A project folder as the training stages leave it: history and validation CSVs, an evaluation's metrics."""
    stage = root / "runs" / "finetune_ve"
    stage.mkdir(parents=True)
    history = ["step,epoch,alpha,loss,lr,samples_per_s"]
    history += [f"{10 * i},{i / 4},0.4,{1.1 - 0.01 * i},2e-5,50" for i in range(1, 4 * len(ve_dev) + 1)]
    (stage / "history.csv").write_text("\n".join(history) + "\n")
    validation = ["step,epoch,accuracy,acc_entailment"]
    validation += [f"{40 * e},{e},{acc},{acc}" for e, acc in enumerate(ve_dev, 1)]
    (stage / "validation.csv").write_text("\n".join(validation) + "\n")
    (root / "metrics").mkdir()
    ve = {"accuracy": 41.0, "hypothesis_only_accuracy": 37.4, "majority_baseline": 33.3, "records": 270}
    (root / "metrics" / "ve.json").write_text(json.dumps(ve))
    if vqa_test is not None:
        (root / "metrics" / "vqa.json").write_text(json.dumps({"accuracy": vqa_test}))
    return root


def test_learning_curves_keep_every_run_in_order_with_its_baselines_and_redraw_from_the_record(tmp_path):
    import learning_curves

    default = _fake_run(tmp_path / "default", [40.0, 41.1])
    longer = _fake_run(tmp_path / "longer", [39.3, 43.3, 44.1])
    record_path = tmp_path / "out" / "curves.json"
    argv = ["--run", str(default), "--extra", f"VE, 3 epochs={longer}", "--record", str(record_path)]
    assert learning_curves.main(argv) == 0

    record = json.loads(record_path.read_text())
    assert [run["label"] for run in record["runs"]] == ["default", "VE, 3 epochs"]
    assert record["runs"][1]["stages"]["finetune_ve"]["validation"] == {
        "epoch": [1.0, 2.0, 3.0],
        "accuracy": [39.3, 43.3, 44.1],
    }
    assert len(record["runs"][0]["stages"]["finetune_ve"]["history"]["loss"]) == 8
    assert record["runs"][0]["metrics"]["ve"] == {
        "accuracy": 41.0,
        "hypothesis_only_accuracy": 37.4,
        "majority_baseline": 33.3,
    }
    assert record["command"].startswith("python benchmarks/learning_curves.py --run ")
    png = record_path.with_suffix(".png")
    assert png.stat().st_size > 20_000
    png.unlink()
    assert learning_curves.main(["--from-record", str(record_path)]) == 0 and png.stat().st_size > 20_000

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty: no runs/<stage>/history.csv"):
        learning_curves.main(["--run", str(tmp_path / "empty"), "--record", str(record_path)])


def test_the_readme_shows_the_committed_learning_curves():
    record = json.loads((REPO / "benchmarks/results/learning-curves.json").read_text())
    assert record["runs"][0]["stages"].keys() >= {"pretrain", "finetune_ve", "finetune_vqa", "finetune_nlvr"}
    readme = (REPO / "README.md").read_text()
    assert "benchmarks/results/learning-curves.png" in readme and record["command"] in readme
    assert (REPO / "benchmarks/results/learning-curves.png").stat().st_size > 50_000
