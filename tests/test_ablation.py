"""benchmarks/ablation.py: the rows of ALBEF Table 1 as loss switches, the seed statistics and verdicts, and a
small ablation run end to end (smoke sizes, two rows, two seeds) whose runs really differ by row and seed."""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import ablation  # noqa: E402


def test_each_row_adds_one_component_to_the_row_before():
    rows = list(ablation.ROWS)
    assert rows[0] == "mlm_itm" and rows[-1] == "mod_finetune"
    first = ablation.row_overrides(rows[0], seed=0)
    assert first["pretrain.itc"] is False and first["finetune_retrieval.mod"] is False
    full = ablation.row_overrides(rows[-1], seed=0)
    assert all(
        value is True for key, value in full.items() if not key.endswith(".seed")
    )  # params.yaml's defaults
    for before, after in itertools.pairwise(rows):
        a, b = ablation.ROWS[before][1], ablation.ROWS[after][1]
        turned_on = [k for k in a if a[k] != b[k]]
        assert turned_on and all(b[k] and not a[k] for k in turned_on), (before, after)
        assert len(turned_on) == 1 or turned_on == ["mod_itc", "mod_mlm"], turned_on


def test_every_row_is_a_valid_switch_set_and_the_seed_reaches_every_training_stage():
    from albef.config import LossSwitches

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for row in ablation.ROWS:
        p = ablation._set(params, ablation.row_overrides(row, seed=7))
        LossSwitches(
            **{k: p["pretrain"][k] for k in ("itc", "itm_hard_negatives", "mod_itc", "mod_mlm")}
        ).validate()
        for section in ablation.TRAIN_SECTIONS:
            assert p[section]["seed"] == 7, section
    assert params["pretrain"]["seed"] == 42  # the project's params are not changed in place


def _result(row, seed, value):
    return {"row": row, "seed": seed, "seconds": 1.0, "metrics": {"VQA": value}}


def test_verdicts_compare_the_change_with_the_seed_spread():
    results = [
        *(_result("itc", s, v) for s, v in enumerate([50.0, 51.0, 52.0])),
        *(_result("hard_neg", s, v) for s, v in enumerate([60.0, 61.0, 62.0])),  # clearly better
        *(_result("mod_pretrain", s, v) for s, v in enumerate([59.0, 61.5, 63.0])),  # overlaps: noise
        *(_result("mod_finetune", s, v) for s, v in enumerate([40.0, 40.5, 41.0])),  # clearly worse
    ]
    rows = ["itc", "hard_neg", "mod_pretrain", "mod_finetune"]
    summary = ablation.summarise(results, rows)
    stat = summary["itc"]["VQA"]
    assert stat["mean"] == pytest.approx(51.0) and stat["std"] == pytest.approx(1.0) and stat["n"] == 3
    assert ablation.verdict(summary["itc"]["VQA"], summary["hard_neg"]["VQA"]) == "better"
    assert ablation.verdict(summary["hard_neg"]["VQA"], summary["mod_pretrain"]["VQA"]) == "within noise"
    assert ablation.verdict(summary["mod_pretrain"]["VQA"], summary["mod_finetune"]["VQA"]) == "worse"
    text = ablation.table(summary, rows)
    assert "| + ITM hard negatives (3 seeds) | 61.0 ± 1.0 (+10.0, better) |" in text
    assert "(-20.7, worse)" in text


def test_the_readme_block_is_replaced_and_a_readme_without_one_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{ablation.README_BEGIN}\nold table\n{ablation.README_END}\nafter\n")
    report = {
        "date": "2026-12-05",
        "machine": "2 CPU cores, no GPU",
        "command": "python benchmarks/ablation.py",
        "seeds": [0, 1, 2],
        "seconds": 600.0,
        "table": "| row | VQA |\n|---|---|\n| MLM + ITM | 1.0 ± 0.0 |",
    }
    ablation.write_readme(readme, report)
    text = readme.read_text()
    assert "old table" not in text and "| MLM + ITM | 1.0 ± 0.0 |" in text
    assert text.startswith("intro\n") and text.endswith("after\n") and "Measured 2026-12-05" in text
    (tmp_path / "other.md").write_text("no block\n")
    with pytest.raises(SystemExit, match="no ablation block"):
        ablation.write_readme(tmp_path / "other.md", report)


def test_collect_summarises_the_finished_runs_runs_nothing_and_names_the_missing_ones(tmp_path):
    work = tmp_path / "ablation"
    finished = {("mlm_itm", 0): 40.0, ("mlm_itm", 1): 42.0, ("itc", 0): 55.0}
    for (row, seed), value in finished.items():
        folder = work / row / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(_result(row, seed, value)))
    (work / "itc" / "seed1").mkdir()  # begun, not finished: no result.json
    readme = tmp_path / "README.md"
    readme.write_text(f"{ablation.README_BEGIN}\n{ablation.README_END}\n")
    args = ["--collect", "--work", str(work), "--seeds", "0", "1", "--readme", str(readme)]
    assert ablation.main(["--rows", "mlm_itm", "itc", "hard_neg", *args]) == 0
    report = json.loads((work / "ablation.json").read_text())
    assert report["rows"] == ["mlm_itm", "itc"] and len(report["runs"]) == 3
    assert report["missing"] == ["itc seed 1", "hard_neg seed 0", "hard_neg seed 1"]
    assert report["command"] == "python benchmarks/ablation.py --rows mlm_itm itc hard_neg --seeds 0 1"
    assert report["summary"]["mlm_itm"]["VQA"]["mean"] == pytest.approx(41.0)
    text = readme.read_text()
    # a row measured with one seed has no spread: its change is shown, with no verdict
    assert "| + ITC (1 seed) | 55.0 ± 0.0 (+14.0, one seed) |" in text
    assert "Not finished yet, so not in the table: itc seed 1, hard_neg seed 0, hard_neg seed 1." in text
    assert not (work / "shared").exists()  # nothing was run
    with pytest.raises(SystemExit, match="no finished run"):
        ablation.main(["--rows", "mod_pretrain", *args])


def test_the_readme_block_is_the_rendering_of_the_committed_record():
    record = REPO / "benchmarks" / "results" / "ablation.json"
    report = json.loads(record.read_text())
    # the table is the summary of the record's runs, and the README shows that table and its plot
    summary = ablation.summarise(report["runs"], report["rows"])
    assert ablation.table(summary, report["rows"]) == report["table"]
    assert ablation.readme_block(report) in (REPO / "README.md").read_text(), (
        "README.md's ablation block is stale: python benchmarks/ablation.py --collect --readme README.md "
        "--record benchmarks/results/ablation.json"
    )
    assert (REPO / report["plot"]).is_file()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_smoke_ablation_runs_each_row_and_seed_and_a_rerun_is_identical(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    work = tmp_path / "ablation"
    argv = ["--project", str(project), "--work", str(work), "--profile", "smoke", "--in-process"]
    argv += ["--rows", "mlm_itm", "mod_finetune", "--seeds", "0", "1", "--tasks", "retrieval"]
    assert ablation.main(argv) == 0

    report = json.loads((work / "ablation.json").read_text())
    assert [(r["row"], r["seed"]) for r in report["runs"]] == [
        ("mlm_itm", 0),
        ("mlm_itm", 1),
        ("mod_finetune", 0),
        ("mod_finetune", 1),
    ]
    for run in report["runs"]:
        assert {"zero-shot TR@1", "retrieval r_mean", "shifted r_mean"} <= set(run["metrics"]), run
    assert report["summary"]["mlm_itm"]["retrieval r_mean"]["n"] == 2
    assert (work / "ablation.png").stat().st_size > 10_000
    assert "| MLM + ITM (2 seeds) |" in (work / "ablation.md").read_text()

    # each run pretrained with its row's switches and its seed, into its own weights
    params = {
        (row, seed): yaml.safe_load((work / row / f"seed{seed}" / "params.yaml").read_text())
        for row in ("mlm_itm", "mod_finetune")
        for seed in (0, 1)
    }
    assert params[("mlm_itm", 0)]["pretrain"]["itc"] is False
    assert params[("mod_finetune", 1)]["pretrain"]["itc"] is True
    assert params[("mod_finetune", 1)]["finetune_retrieval"]["seed"] == 1
    weights = {
        key: _digest(work / key[0] / f"seed{key[1]}" / "models/pretrain/model.safetensors") for key in params
    }
    assert len(set(weights.values())) == 4

    # a fresh run of the same row and seed, on the same data and encoders (the shared folder the first made,
    # whose params.yaml already holds the profile), gives the same weights and metrics
    again = tmp_path / "again"
    shared = work / "shared"
    assert (shared / "models/unimodal").is_dir()
    rerun_argv = ["--project", str(shared), "--work", str(again), "--in-process"]
    assert ablation.main([*rerun_argv, "--rows", "mlm_itm", "--seeds", "1", "--tasks", "retrieval"]) == 0
    rerun = json.loads((again / "ablation.json").read_text())["runs"][0]
    assert _digest(again / "mlm_itm/seed1/models/pretrain/model.safetensors") == weights[("mlm_itm", 1)]
    assert rerun["metrics"] == report["runs"][1]["metrics"]

    # an interrupted run continues: finished stages are not run again, the unfinished one is
    run_dir = again / "mlm_itm/seed1"
    pretrained = run_dir / "models/pretrain/model.safetensors"
    pretrained_at = pretrained.stat().st_mtime_ns
    (run_dir / "result.json").unlink()
    (run_dir / "logs/evaluate_retrieval.done").unlink()
    (run_dir / "metrics/retrieval.json").unlink()
    assert ablation.main([*rerun_argv, "--rows", "mlm_itm", "--seeds", "1", "--tasks", "retrieval"]) == 0
    assert pretrained.stat().st_mtime_ns == pretrained_at
    assert json.loads((again / "ablation.json").read_text())["runs"][0]["metrics"] == rerun["metrics"]

    # the full model's row pretrains exactly as the row before it: it reuses that pretraining
    argv = [*rerun_argv, "--rows", "mod_pretrain", "mod_finetune", "--seeds", "1", "--tasks", "retrieval"]
    assert ablation.main(argv) == 0
    reused = again / "mod_finetune/seed1/models/pretrain"
    assert (
        reused.is_symlink() and reused.resolve() == (again / "mod_pretrain/seed1/models/pretrain").resolve()
    )
    assert not (again / "mod_finetune/seed1/logs/pretrain.done").exists()
    assert _digest(reused / "model.safetensors") == weights[("mod_finetune", 1)]
