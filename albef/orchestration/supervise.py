"""``python -m albef.orchestration.supervise [--deadline S] [--grace S] -- command ...``

Runs ``command`` in a process group of its own and guarantees that the command and everything it started
(dvc, the stage, torchrun and its workers, data-loader workers) stops when any of these happens:

* the wall-clock deadline passes (exit status 124),
* the supervisor gets SIGTERM, SIGINT or SIGHUP: a cancelled Prefect flow run (exit status 143),
* the process that started the supervisor dies, even by SIGKILL (Linux: the parent-death signal).

Stopping is SIGTERM to every process (the group, and each descendant, since torchrun puts its workers in
sessions of their own), ``--grace`` seconds to exit, then SIGKILL. The supervisor registers as a child
subreaper, so processes whose parent died are re-parented to it and still found. Otherwise it exits with
the command's status (128 + signal when a signal ended it).

Only the standard library and psutil are imported: it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil

DEADLINE_STATUS = 124
TERMINATED_STATUS = 143
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _say(message: str) -> None:
    # the reader may be gone (the flow process was killed): a broken pipe must not stop the clean-up
    with contextlib.suppress(OSError, ValueError):
        print(f"albef-supervise: {message}", file=sys.stderr, flush=True)


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_all(procs: list[psutil.Process], group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):  # none left
        while os.waitpid(-1, os.WNOHANG)[0]:  # 0: none has exited yet
            pass


def stop_all(child: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the command's group and every descendant, then SIGKILL to whatever is left."""
    procs = _descendants()
    _signal_all(procs, child.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap()
        if not any(_running(p) for p in _descendants()):
            break
        time.sleep(0.1)
    leftover = _descendants()
    if leftover:
        _signal_all(leftover, child.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=10)
    end = time.monotonic() + 10
    while _descendants() and time.monotonic() < end:
        _reap()
        time.sleep(0.05)
    _reap()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m albef.orchestration.supervise")
    parser.add_argument("--deadline", type=float, default=0.0, help="wall-clock seconds (0: none)")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--parent", type=int, default=0, help="stop when this process is gone")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")

    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if args.parent and os.getppid() != args.parent:
        _say("the process that started this stage is gone; not starting it")
        return TERMINATED_STATUS

    started = time.monotonic()
    child = subprocess.Popen(command, process_group=0)
    try:
        return _supervise(child, args, stop, started)
    except BaseException:
        stop_all(child, args.grace)
        raise
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
            sys.stdout.flush()


def _supervise(child: subprocess.Popen, args: argparse.Namespace, stop: list[int], started: float) -> int:
    reason = None
    while True:
        try:
            status = child.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        if stop:
            reason = f"received {signal.Signals(stop[0]).name}"
        elif args.deadline and time.monotonic() - started > args.deadline:
            reason = f"deadline of {args.deadline:g} s passed"
        elif args.parent and os.getppid() != args.parent:
            reason = "the process that started this stage is gone"
        if reason:
            break
    if reason is None:
        if any(_running(p) for p in _descendants()):  # e.g. a worker that outlived its stage
            stop_all(child, grace=min(args.grace, 2.0))
        _reap()
        return status if status >= 0 else 128 - status
    _say(f"{reason}: stopping the stage's processes (SIGTERM, then SIGKILL after {args.grace:g} s)")
    stop_all(child, args.grace)
    return DEADLINE_STATUS if reason.startswith("deadline") else TERMINATED_STATUS


if __name__ == "__main__":
    sys.exit(main())
