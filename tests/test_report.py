"""albef report: one row per task from the metrics files, with its baseline and the registry's champion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from albef.report import TASKS, report_stage

REPO = Path(__file__).resolve().parents[1]


def _write(root: Path, name: str, data: dict) -> None:
    (root / "metrics").mkdir(parents=True, exist_ok=True)
    (root / "metrics" / name).write_text(json.dumps(data))


def test_each_task_gets_its_metric_baseline_and_champion(tmp_path):
    _write(
        tmp_path,
        "retrieval.json",
        {"txt_r1": 6.2, "img_r1": 2.5, "r_mean": 17.7, "chance_r1": {"txt": 0.2, "img": 0.2}},
    )
    _write(tmp_path, "ve.json", {"accuracy": 65.6, "majority_baseline": 33.3, "records": 900})
    _write(
        tmp_path,
        "grounding.json",
        {
            "accuracy": 17.2,
            "layer": 3,
            "expressions": 30,
            "splits": {
                "val": {"random_proposal": 10.0, "expressions": 10},
                "testA": {"random_proposal": 4.0, "expressions": 20},
            },
        },
    )
    _write(
        tmp_path, "register.json", {"registered": True, "version": 3, "promoted": False, "champion_before": 2}
    )
    _write(
        tmp_path,
        "register_ve.json",
        {"registered": True, "version": 1, "promoted": True, "champion_before": None},
    )
    rows = {r.task: r for r in report_stage(tmp_path)}
    assert len(rows) == len(TASKS)
    retrieval = rows["retrieval (finetuned)"]
    assert (retrieval.value, retrieval.baseline, retrieval.champion) == (4.35, 0.2, "v2")  # the gate kept v2
    assert (rows["SNLI-VE"].value, rows["SNLI-VE"].baseline, rows["SNLI-VE"].champion) == (65.6, 33.3, "v1")
    assert rows["grounding (Grad-CAM)"].baseline == 6.0  # random proposals weighted by expressions
    assert rows["VQA"].value is None and "missing" in rows["VQA"].detail  # not evaluated: said, not hidden
    written = json.loads((tmp_path / "metrics" / "summary.json").read_text())
    assert written["SNLI-VE"]["champion"] == "v1"


def test_the_report_command_prints_one_screen(tmp_path):
    _write(tmp_path, "nlvr.json", {"accuracy": 51.7, "majority_baseline": 50.0, "records": 200})
    done = subprocess.run(
        [sys.executable, "-m", "albef", "report", "--project", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 + len(TASKS) and max(map(len, lines)) < 160
    assert any(
        line.startswith("NLVR2") and "51.7" in line and "50.0 majority class" in line for line in lines
    )


def test_vqa_and_ve_show_their_measured_text_only_baseline(tmp_path):
    _write(
        tmp_path,
        "vqa.json",
        {
            "accuracy": 46.1,
            "question_only_accuracy": 47.8,
            "questions": 1017,
            "answer_list_oracle_accuracy": 100,
        },
    )
    _write(
        tmp_path,
        "ve.json",
        {"accuracy": 66.7, "majority_baseline": 33.3, "hypothesis_only_accuracy": 71.9, "records": 270},
    )
    _write(
        tmp_path,
        "nlvr.json",
        {"accuracy": 51.7, "majority_baseline": 50.0, "sentence_only_accuracy": 52.8, "records": 180},
    )
    rows = {r.task: r for r in report_stage(tmp_path, out=None)}
    assert (rows["VQA"].baseline, rows["VQA"].baseline_name) == (47.8, "text only (question)")
    assert (rows["SNLI-VE"].baseline, rows["SNLI-VE"].baseline_name) == (71.9, "text only (hypothesis)")
    assert "majority class 33.3" in rows["SNLI-VE"].detail  # still said, beside the measured one
    assert (rows["NLVR2"].baseline, rows["NLVR2"].baseline_name) == (52.8, "text only (sentence)")
