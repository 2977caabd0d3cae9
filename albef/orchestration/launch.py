"""Several processes per node without touching ``dvc.yaml``: the training and evaluation commands re-execute
themselves under ``torchrun`` when the environment asks for it.

The Prefect flows set ``ALBEF_NPROC_PER_NODE`` (and, for several nodes, ``ALBEF_NNODES``,
``ALBEF_RDZV_ENDPOINT``, ``ALBEF_RDZV_ID``) for the ``dvc repro`` they run. ``dvc.yaml`` keeps its
one-process commands, so the stage definitions, their cache and ``dvc.lock`` are the same whether a stage ran
on one CPU or on eight GPUs; only the launch differs. Without these variables (or already under torchrun or
SLURM) nothing happens.
"""

from __future__ import annotations

import os
import sys

ENV_NPROC = "ALBEF_NPROC_PER_NODE"
ENV_NNODES = "ALBEF_NNODES"
ENV_RDZV_ENDPOINT = "ALBEF_RDZV_ENDPOINT"
ENV_RDZV_ID = "ALBEF_RDZV_ID"
# the commands that run one process per GPU (every rank computes, rank 0 writes)
DISTRIBUTED_COMMANDS = ("pretrain", "finetune", "evaluate")


def torchrun_argv(argv: list[str], env: dict[str, str] | None = None) -> list[str] | None:
    """The ``python -m torch.distributed.run ... -m albef <argv>`` command line for ``argv``, or None when
    this process should run as it is."""
    env = dict(os.environ) if env is None else env
    nproc = int(env.get(ENV_NPROC, "0") or 0)
    nnodes = int(env.get(ENV_NNODES, "1") or 1)
    if nproc <= 1 and nnodes <= 1:
        return None
    if "RANK" in env or ("SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1):
        return None  # already one of several processes
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in DISTRIBUTED_COMMANDS:
        return None
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(max(nproc, 1))]
    if nnodes > 1:
        endpoint = env.get(ENV_RDZV_ENDPOINT)
        if not endpoint:
            raise SystemExit(f"albef: {ENV_NNODES}={nnodes} needs {ENV_RDZV_ENDPOINT}=host:port")
        launcher += [
            "--nnodes",
            str(nnodes),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            endpoint,
            "--rdzv_id",
            env.get(ENV_RDZV_ID, "albef"),
        ]
    else:
        launcher.append("--standalone")
    return [*launcher, "-m", "albef", *argv]


def relaunch_if_requested(argv: list[str] | None = None) -> None:
    """Replace this process with torchrun running the same command when the environment asks for several
    processes (same pid, so the caller's process group and deadline still hold it)."""
    argv = sys.argv[1:] if argv is None else argv
    command = torchrun_argv(list(argv))
    if command is None:
        return
    print(f"albef: launching {' '.join(command[1:])}", file=sys.stderr, flush=True)
    os.execv(command[0], command)
