"""``dvc plots show`` renders offline: the project's ``.dvc/config`` points ``plots.html_template`` at a template
that inlines the vendored vega, vega-lite and vega-embed (``vendor/vega/``) instead of DVC's default page,
which loads them from cdn.jsdelivr.net and stays blank without internet."""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENDOR = REPO / "vendor" / "vega"
GENERATOR = REPO / "vendor" / "vega" / "build_template.py"
LIBRARIES = ("vega", "vega-lite", "vega-embed")


def _load_generator():
    spec = importlib.util.spec_from_file_location("plots_template", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = _load_generator()

# a tag that makes the browser fetch from the network: <script src>, <link href>, <img src>, ... with an
# http(s) or protocol-relative address; CSS @import and url() likewise
_REMOTE_TAG = re.compile(
    r"<(?:script|link|img|iframe|object|embed|source)\b[^>]*?\b(?:src|href|data)\s*=\s*[\"']?\s*(?:https?:)?//[^>]*>",
    re.IGNORECASE,
)
_REMOTE_CSS = re.compile(r"@import\b|url\(\s*[\"']?\s*(?:https?:)?//", re.IGNORECASE)


def _network_loads(html: str) -> list[str]:
    return [m.group(0) for m in (*_REMOTE_TAG.finditer(html), *_REMOTE_CSS.finditer(html))]


def _html_template_setting() -> str:
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    return config.get("plots", "html_template", fallback="")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DVC_NO_ANALYTICS="1", GIT_CONFIG_NOSYSTEM="1")
    return env


def _project(root: Path, *, with_config: bool = True) -> Path:
    """A minimal git + DVC project at ``root``: the project's ``.dvc/config`` and the template at the path the
    config names (relative to ``.dvc/``, as DVC resolves it), a ``dvc.yaml`` with a ``plots:`` section shaped
    like the project's, and its CSV."""
    (root / ".dvc").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(root)], check=True, env=_env())
    if with_config:
        shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
        target = root / ".dvc" / _html_template_setting()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / ".dvc" / _html_template_setting(), target)
    (root / "plots" / "pretrain").mkdir(parents=True)
    (root / "plots" / "pretrain" / "train.csv").write_text(
        "step,loss,loss_itc\n0,2.718281,1.414213\n10,1.732050,0.577215\n20,0.693147,0.301029\n"
    )
    (root / "dvc.yaml").write_text(
        "plots:\n"
        "  - training losses:\n"
        "      x: step\n"
        "      y:\n"
        "        plots/pretrain/train.csv: [loss, loss_itc]\n"
    )
    return root


def _plots_show(root: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show"],
        cwd=root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"dvc plots show failed:\n{result.stdout}\n{result.stderr}"
    return (root / "dvc_plots" / "index.html").read_text(encoding="utf-8")


def _vendored_code(name: str) -> str:
    """The vendored build without its trailing source-map comment (the .map files are not vendored)."""
    return (VENDOR / f"{name}.min.js").read_text(encoding="utf-8").split("\n//# sourceMappingURL=")[0]


def test_config_points_at_the_vendored_template():
    setting = _html_template_setting()
    assert setting, ".dvc/config sets no plots.html_template"
    assert not os.path.isabs(setting), "plots.html_template must be relative (to .dvc/) to work in any clone"
    assert (REPO / ".dvc" / setting).resolve() == (VENDOR / "dvc_plots_template.html").resolve()
    for name in LIBRARIES:
        assert (VENDOR / f"{name}.min.js").is_file()
        assert (VENDOR / f"LICENSE.{name}").is_file()


def test_committed_template_is_generated_from_the_vendored_files():
    assert set(generator.VERSIONS) == set(LIBRARIES)
    committed = (VENDOR / "dvc_plots_template.html").read_text(encoding="utf-8")
    assert committed == generator.render(), "stale template: run python vendor/vega/build_template.py"


def test_plots_show_renders_offline(tmp_path):
    html = _plots_show(_project(tmp_path / "project"))

    assert _network_loads(html) == [], "the page loads from the network"
    assert "cdn.jsdelivr.net" not in html
    assert not re.search(r"<script\b[^>]*\bsrc\s*=", html, re.IGNORECASE), "a script is not inlined"
    for name in LIBRARIES:
        assert _vendored_code(name) in html, f"{name} is not inlined"
    for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}"):
        assert placeholder not in html
    # the plot: its div, the vegaEmbed call and the CSV's values in the spec
    assert '<div id = "training_losses">' in html
    assert "vegaEmbed('#training_losses', spec)" in html
    for value in ("2.718281", "1.414213", "0.693147", "0.301029"):
        assert f'"{value}"' in html
    # DVC's specs are vega-lite specs of the major version vendored
    majors = set(re.findall(r'"\$schema": "https://vega\.github\.io/schema/vega-lite/v(\d+)\.json"', html))
    assert majors == {generator.VERSIONS["vega-lite"].split(".")[0]}, majors


def test_without_the_setting_dvc_loads_from_the_cdn(tmp_path):
    """The check above would catch a regression: DVC's own page is flagged."""
    html = _plots_show(_project(tmp_path / "project", with_config=False))
    assert any("cdn.jsdelivr.net" in tag for tag in _network_loads(html))
