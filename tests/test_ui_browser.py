"""The Prefect and MLflow UIs in a real browser: headless Debian Chromium (tests/browser.py, one for the module)
opens the pages of the shared ``full_pipeline`` run (the harness's ``prefect server start`` on loopback, and an
``mlflow server`` on the project's sqlite store started here), moving between them as the apps' own links do,
and checks that the run, its artifacts, the metrics and the example images render, each image loaded at the
PNG's own size. Requests that leave loopback are aborted, so the pages render offline. Screenshots land in
the test's tmp_path/screenshots and, when ALBEF_TEST_OUTPUT is set, in $ALBEF_TEST_OUTPUT/ui-browser."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from browser import chromium, loaded_images, screenshot, screenshot_on_failure
from conftest import ServiceProcess, free_port, mlflow_env
from mlflow import MlflowClient
from PIL import Image
from prefect_harness import _artifacts, _flow_runs_under

pytestmark = pytest.mark.slow

STAGE = "evaluate_retrieval"  # the stage whose metrics and example images the pages must show
METRIC = "r_mean"
TIMEOUT_S = 60  # per page on a loaded 2-core machine (the first MLflow page compiles a large bundle)


@pytest.fixture
def shots(tmp_path) -> list[Path]:
    folders = [tmp_path / "screenshots"]
    if os.environ.get("ALBEF_TEST_OUTPUT"):
        folders.append(Path(os.environ["ALBEF_TEST_OUTPUT"]) / "ui-browser")
    return folders


@pytest.fixture(scope="module", autouse=True)
def mlflow_ui(full_pipeline_run, project, tmp_path_factory):
    """``mlflow server`` on the project's embedded store, on loopback, run from the project (the store keeps
    artifact locations relative to it); started in the background while the Prefect pages are checked (its
    start-up takes 10-30 s). A future of the server."""
    port = free_port()
    cmd = [
        *("env", "-C", str(project)),
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        *("--backend-store-uri", "sqlite:///mlflow.db"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    log = tmp_path_factory.mktemp("mlflow-ui") / "server.log"
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(ServiceProcess, cmd, f"http://127.0.0.1:{port}", log, mlflow_env())
        try:
            yield starting
        finally:
            with contextlib.suppress(Exception):
                starting.result(timeout=120).stop()


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def _png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def _markdown_table(markdown: str) -> dict[str, str]:
    """{first cell: second cell} of a two-column markdown table (header and rule left out)."""
    rows = re.findall(r"^\|\s*([^|]+?)\s*\|\s*([^|]*?)\s*\|\s*$", markdown, re.M)
    return {k: v for k, v in rows if k != "metric" and not set(k) <= set("-:")}


def _report(browser, origin: str, written: list[Path]) -> None:
    """Print the screenshots and what the pages at ``origin`` logged. Logged errors fail nothing: what counts
    is what renders (the Prefect UI, for one, logs a missing icon, /ico/undefined.svg, and now and then an
    uncaught "reading 'getBoundingClientRect'" error on the flow-run page as the view changes)."""
    print("screenshots:", *written, sep="\n  ")
    for what, found in (
        ("console errors", browser.console_errors),
        ("uncaught exceptions", browser.page_errors),
    ):
        mine = [e for e in found if e.startswith(origin)]
        if mine:
            print(f"{what}:", *mine, sep="\n  ")
    if browser.blocked:
        print("requests aborted (not loopback):", *browser.blocked, sep="\n  ")


def test_prefect_ui_shows_the_pipeline_run_its_metrics_and_images(full_pipeline_run, prefect, browser, shots):
    api = prefect["PREFECT_API_URL"]
    ui = api.removesuffix("/api")
    with urllib.request.urlopen(f"{ui}/ui-settings", timeout=10) as response:
        ui_api = json.load(response)["api_url"]
    assert ui_api == api, (
        f"the UI served at {ui} calls the API at {ui_api}, not {api}: the server needs PREFECT_SERVER_API_PORT "
        "(or PREFECT_UI_API_URL) set to its port, `--port` alone does not reach the UI's settings"
    )
    runs = {r.id: r for r in _flow_runs_under(full_pipeline_run.id)}
    artifacts = _artifacts(list(runs))
    key = STAGE.replace("_", "-")
    missing = [k for k in (f"{key}-metrics", f"{key}-examples") if k not in artifacts]
    assert not missing, f"the pipeline run left no artifacts {missing}; it has {sorted(artifacts)}"
    metrics, examples = artifacts[f"{key}-metrics"], artifacts[f"{key}-examples"]
    subflow = runs[examples.flow_run_id]
    table = _markdown_table(metrics.data)
    assert METRIC in table, metrics.data
    (encoded,) = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", examples.data)
    width, height = _png_size(base64.b64decode(encoded))
    written: list[Path] = []

    # the pipeline's flow run: its name and final state in the page heading
    page = browser.open(
        f"{ui}/runs/flow-run/{full_pipeline_run.id}", ".page-heading-flow-run .state-badge", TIMEOUT_S
    )
    with screenshot_on_failure(page, shots, "prefect-flow-run"):
        heading = page.locator(".page-heading-flow-run")
        assert full_pipeline_run.name in heading.inner_text()
        assert heading.locator(".state-badge").inner_text().strip() == full_pipeline_run.state.name
        written += screenshot(page, shots, "prefect-flow-run")

    # the stage's subflow run: its Artifacts tab lists the metrics and the examples
    with screenshot_on_failure(page, shots, "prefect-subflow-artifacts"):
        browser.go(
            page,
            f"{ui}/runs/flow-run/{subflow.id}",
            f'.page-heading-flow-run:has-text("{subflow.name}")',
            TIMEOUT_S,
        )
        page.locator("li.p-tab#artifacts").click()
        for artifact in (metrics, examples):
            page.get_by_text(artifact.key, exact=True).first.wait_for(timeout=TIMEOUT_S * 1000)
        written += screenshot(page, shots, "prefect-subflow-artifacts")

    # the metrics artifact: the markdown table rendered, every metric with its value
    with screenshot_on_failure(page, shots, "prefect-metrics"):
        browser.go(page, f"{ui}/artifacts/artifact/{metrics.id}", f'td:text-is("{METRIC}")', TIMEOUT_S)
        cells = page.eval_on_selector_all(
            "tr", "rows => rows.map(r => [...r.querySelectorAll('td')].map(c => c.innerText.trim()))"
        )
        shown = {row[0]: row[1] for row in cells if len(row) == 2}
        assert shown == table, f"rendered {shown}, markdown {table}"
        page.locator(f'td:text-is("{METRIC}")').scroll_into_view_if_needed()
        written += screenshot(page, shots, "prefect-metrics")

    # the examples artifact: the inline PNG decoded at its real size
    with screenshot_on_failure(page, shots, "prefect-examples"):
        browser.go(page, f"{ui}/artifacts/artifact/{examples.id}", 'img[src^="data:image/png"]', TIMEOUT_S)
        shown = loaded_images(page, 'img[src^="data:image/png"]', TIMEOUT_S)
        assert [(i["naturalWidth"], i["naturalHeight"]) for i in shown] == [(width, height)], shown
        written += screenshot(page, shots, "prefect-examples")
    page.close()
    _report(browser, ui, written)


def test_mlflow_ui_shows_the_stage_run_its_metrics_and_images(
    full_pipeline_run, project, mlflow_ui, browser, shots
):
    server = mlflow_ui.result(timeout=180)
    # the stage's run, nested under the pipeline's parent run, read back through the server
    client = MlflowClient(server.url)
    experiment = yaml.safe_load((project / "params.yaml").read_text())["mlflow"]["experiment"]
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (parent,) = client.search_runs(
        [experiment_id], f"tags.`albef.prefect.flow_run_id` = '{full_pipeline_run.id}'"
    )
    stage_runs = client.search_runs(
        [experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`albef.stage` = '{STAGE}'",
    )
    assert len(stage_runs) == 1, f"{len(stage_runs)} {STAGE} runs under the pipeline's parent run"
    run = stage_runs[0].info
    value = stage_runs[0].data.metrics[METRIC]
    uri = run.artifact_uri.removeprefix("file://")
    artifacts = Path(uri) if Path(uri).is_absolute() else project / uri
    pngs = sorted(artifacts.rglob("*.png"))
    assert pngs, f"the {STAGE} run logged no PNG under {artifacts}"
    png = pngs[0]
    width, height = _png_size(png.read_bytes())
    run_url = f"{server.url}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
    written: list[Path] = []

    # the run page: the metric's name, linked to its chart, with its value in the same row
    page = browser.open(run_url, f'a:text-is("{METRIC}")', TIMEOUT_S)
    with screenshot_on_failure(page, shots, "mlflow-run"):
        row = page.locator(f'[role="row"]:has(a:text-is("{METRIC}"))').first
        numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", row.inner_text())]
        assert any(abs(n - value) <= 1e-3 * max(1.0, abs(value)) for n in numbers), (row.inner_text(), value)
        row.scroll_into_view_if_needed()
        written += screenshot(page, shots, "mlflow-run")

    # the artifact viewer on the PNG: the image fetched from the server, at its real size
    relative = png.relative_to(artifacts).as_posix()
    with screenshot_on_failure(page, shots, "mlflow-artifact"):
        browser.go(page, f"{run_url}/artifacts/{relative}", 'img[src^="blob:"]', TIMEOUT_S)
        shown = loaded_images(page, 'img[src^="blob:"]', TIMEOUT_S)
        assert shown, f"no image of {relative} loaded in the artifact viewer"
        assert {(i["naturalWidth"], i["naturalHeight"]) for i in shown} == {(width, height)}, shown
        written += screenshot(page, shots, "mlflow-artifact")
    page.close()
    _report(browser, server.url, written)
