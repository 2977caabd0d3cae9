"""A stage command run the way long GPU work must run under an orchestrator.

The command runs under :mod:`albef.orchestration.supervise` in a process group of its own with its own
wall-clock deadline. A Prefect timeout cannot interrupt blocking code (PrefectHQ/prefect#15760), so the
deadline lives in the supervisor; when this process is told to stop (Prefect cancels the flow run with
SIGTERM, which the flow engine raises in the main thread) the supervisor stops the whole group, and when
this process dies without warning the supervisor notices and does the same.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from albef.orchestration.supervise import DEADLINE_STATUS, TERMINATED_STATUS

# lines of a stage's output that carry its error (albef's CLI, DVC, Python tracebacks)
_ERROR_LINE = re.compile(r"(^ERROR\b|\berror:|Error\b|^Traceback|exited with|failed to)", re.IGNORECASE)
# a deterministic failure the stage reported itself (bad settings, a diverged run): retrying cannot help
_REPORTED_ERROR = re.compile(r"^albef [\w-]+: error: ")
_RESUMED = re.compile(r"resumed from \S+ \(step (\d+)")
# DVC's line for a stage command killed by a signal: "-9" when its shell exec'd the command, "137" (128 + 9)
# when the shell stayed in between
_KILLED = re.compile(r"exited with (?:-(\d+)|(129|1[3-5]\d))\b")


class StageFailed(RuntimeError):
    """The stage command failed; the message carries its own error lines."""

    def __init__(self, message: str, status: int, retryable: bool):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@dataclass
class StageRun:
    status: int
    seconds: float
    tail: list[str] = field(default_factory=list)  # the last lines of its output
    resumed_steps: list[int] = field(default_factory=list)  # "resumed from ... (step N" lines, in order

    @property
    def resumed_from_step(self) -> int | None:
        """The step the training engine resumed from in this run (None: it started fresh or did not train)."""
        return self.resumed_steps[-1] if self.resumed_steps else None


def run_supervised(
    command: list[str],
    *,
    cwd: str | Path,
    env: dict[str, str] | None = None,
    deadline_s: float | None = None,
    grace_s: float = 10.0,
    on_line: Callable[[str], None] | None = None,
    keep_lines: int = 400,
) -> StageRun:
    """Run ``command`` under the supervisor; stream its output (stdout and stderr) line by line to
    ``on_line``; return its status. Any exception here (cancellation, KeyboardInterrupt) stops the command's
    whole process group before it propagates."""
    supervisor = [
        sys.executable,
        "-m",
        "albef.orchestration.supervise",
        "--deadline",
        str(deadline_s or 0),
        "--grace",
        str(grace_s),
        "--parent",
        str(os.getpid()),
        "--",
        *command,
    ]
    tail: collections.deque[str] = collections.deque(maxlen=keep_lines)
    resumed_steps: list[int] = []
    started = time.monotonic()
    proc = subprocess.Popen(
        supervisor,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # only this code signals the stage, never a group-wide signal meant for us
        text=True,
        errors="replace",
        bufsize=1,
    )

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            # tqdm and friends redraw with carriage returns: keep the last state of each line
            line = raw.rstrip("\n").rsplit("\r", 1)[-1].rstrip()
            if not line:
                continue
            tail.append(line)
            resumed = _RESUMED.search(line)  # seen as it streams: a long run's tail no longer holds it
            if resumed:
                resumed_steps.append(int(resumed.group(1)))
            if on_line is not None:
                with contextlib.suppress(Exception):  # logging must never stop the stage
                    on_line(line)

    reader = threading.Thread(target=pump, name="stage-output", daemon=True)
    reader.start()
    status: int | None = None
    try:
        while status is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                status = proc.wait(timeout=0.5)
    except BaseException:
        _stop(proc, grace_s)
        raise
    reader.join(timeout=10)
    return StageRun(status, time.monotonic() - started, list(tail), resumed_steps)


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace_s + 20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def failure(name: str, run: StageRun, deadline_s: float | None) -> StageFailed:
    """The exception for a failed stage: its status and the error lines of its own output."""
    if run.status == DEADLINE_STATUS:
        return StageFailed(
            f"stage {name} passed its deadline of {deadline_s:g} s and was stopped; a retry resumes from its "
            "newest checkpoint",
            run.status,
            retryable=True,
        )
    if run.status == TERMINATED_STATUS:
        return StageFailed(f"stage {name} was stopped (cancelled)", run.status, retryable=False)
    errors = [line for line in run.tail if _ERROR_LINE.search(line)]
    reported = [line for line in run.tail if _REPORTED_ERROR.search(line)]
    shown = (reported or errors or run.tail)[-8:]
    detail = "\n".join(shown) if shown else "(no output)"
    hint = _kill_hint(errors)
    if hint and not reported:  # on the same line, which summaries of a failure keep
        detail += f" ({hint})"
    return StageFailed(
        f"stage {name} failed (exit status {run.status}):\n{detail}",
        run.status,
        retryable=not reported,
    )


def _kill_hint(error_lines: list[str]) -> str | None:
    """What a signal in DVC's "exited with" line means, for a user reading a failed run in the UI."""
    for line in reversed(error_lines):
        match = _KILLED.search(line)
        if not match:
            continue
        number = int(match[1]) if match[1] else int(match[2]) - 128
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        hint = f"the stage's process was killed by {name}"
        if number == signal.SIGKILL:
            # nothing in the stage sends SIGKILL; the kernel does when the machine runs out of memory
            hint += ", as the kernel's out-of-memory killer does: check `dmesg` and the batch size"
        return hint + "; a retry resumes a training stage from its newest checkpoint"
    return None
