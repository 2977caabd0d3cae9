"""Headless Chromium for the UI tests: Debian's /usr/bin/chromium (installed by .ci/install) driven through
Playwright's sync API (Playwright's own browser download is never used). Every request that does not go to
loopback (or a data:/blob: URL) is aborted and recorded, so a page that renders here renders offline."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from playwright.sync_api import Page, Route, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


class Browser:
    """One Chromium with a fresh profile; ``open`` gives pages. ``blocked`` lists the non-local requests
    aborted, ``console_errors`` what the pages logged as errors and ``page_errors`` their uncaught exceptions
    (each as "URL: message")."""

    def __init__(self, context):
        self.context = context
        self.blocked: list[str] = []
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        context.route("**/*", self._route)

    def _route(self, route: Route) -> None:
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob") or parts.hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def open(self, url: str, ready: str | None = None, timeout_s: float = 30) -> Page:
        """A new page at ``url``, loaded, with ``ready`` (a selector, e.g. ``text=r_mean``) visible."""
        page = self.context.new_page()
        page.set_default_timeout(timeout_s * 1000)
        page.on(
            "console",
            lambda msg: msg.type == "error" and self.console_errors.append(f"{page.url}: {msg.text}"),
        )
        page.on("pageerror", lambda error: self.page_errors.append(f"{page.url}: {error}"))
        page.goto(url, wait_until="load")
        wait_loaded(page, ready, timeout_s)
        return page

    def go(self, page: Page, url: str, ready: str, timeout_s: float = 30) -> Page:
        """``page`` to ``url`` of the same single-page app, as its own links go (the history API and a
        popstate event, which Vue's and React's routers both follow: no reload of the app), then ``ready``
        (a selector only the new view has) visible."""
        page.evaluate(
            "url => { history.pushState(null, '', url); dispatchEvent(new PopStateEvent('popstate')); }", url
        )
        wait_loaded(page, ready, timeout_s)
        return page


def wait_loaded(page: Page, ready: str | None = None, timeout_s: float = 30, idle_s: float = 2) -> None:
    """``ready`` (a selector) visible, then the network idle for a moment (up to ``idle_s``: some pages keep a
    request open or poll, so idle alone never comes); without ``ready``, network idle up to ``timeout_s``."""
    if ready is not None:
        page.locator(ready).first.wait_for(state="visible", timeout=timeout_s * 1000)
    with contextlib.suppress(PlaywrightTimeoutError):
        page.wait_for_load_state("networkidle", timeout=(idle_s if ready else timeout_s) * 1000)


def images(page: Page, selector: str = "img") -> list[dict]:
    """The images under ``selector`` once each has finished loading (or failed): src (cut at 80 characters),
    naturalWidth, naturalHeight."""
    page.wait_for_function(
        "sel => [...document.querySelectorAll(sel)].every(img => img.complete)", arg=selector
    )
    return page.eval_on_selector_all(
        selector,
        "els => els.map(e => ({src: e.currentSrc.slice(0, 80), naturalWidth: e.naturalWidth,"
        " naturalHeight: e.naturalHeight}))",
    )


def loaded_images(page: Page, selector: str = "img", timeout_s: float = 20) -> list[dict]:
    """The images under ``selector`` that loaded with a non-zero natural size, waiting up to ``timeout_s`` for
    at least one."""
    with contextlib.suppress(PlaywrightTimeoutError):
        page.wait_for_function(
            "sel => [...document.querySelectorAll(sel)].some(img => img.complete && img.naturalWidth > 0)",
            arg=selector,
            timeout=timeout_s * 1000,
        )
    return [img for img in images(page, selector) if img["naturalWidth"] > 0 and img["naturalHeight"] > 0]


def screenshot(page: Page, folders: list[Path], name: str) -> list[Path]:
    """A full-page PNG of ``page`` as ``name``.png in each folder; the paths written."""
    first, *rest = folders
    first.mkdir(parents=True, exist_ok=True)
    path = first / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    written = [path]
    for folder in rest:
        folder.mkdir(parents=True, exist_ok=True)
        written.append(Path(shutil.copy(path, folder / path.name)))
    return written


@contextlib.contextmanager
def screenshot_on_failure(page: Page, folders: list[Path], name: str) -> Iterator[None]:
    """On an exception inside, a screenshot of ``page`` as FAILED-``name``.png first (best effort)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            print("screenshot of the failure:", *screenshot(page, folders, f"FAILED-{name}"))
        raise


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1600) -> Iterator[Browser]:
    """Headless Debian Chromium on a fresh profile (removed afterwards)."""
    if not CHROMIUM.exists():
        raise FileNotFoundError(
            f"{CHROMIUM} is missing: run .ci/install as root, or apt-get install --no-install-recommends chromium"
        )
    profile = tempfile.mkdtemp(prefix="albef-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=str(CHROMIUM),
                headless=True,
                args=FLAGS,
                viewport={"width": width, "height": height},
                service_workers="block",
            )
            try:
                yield Browser(context)
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
