"""Serve every deployment of ``prefect.yaml`` in this process, without a work pool or worker:

    python -m flows.serve            # from the checkout; Ctrl-C stops (schedules are paused on shutdown)

The deployments (names, parameters, schedules, descriptions, tags) are read from ``prefect.yaml``, so
``serve`` and ``prefect deploy --all`` offer the same ones; flow runs execute here, in the checkout.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def deployment_specs(path: str | Path = ROOT / "prefect.yaml") -> list[dict[str, Any]]:
    """The ``deployments`` of ``prefect.yaml`` (YAML anchors and merge keys resolved)."""
    return list((yaml.safe_load(Path(path).read_text()) or {}).get("deployments") or [])


def load_flow(entrypoint: str):
    """``flows/stages.py:pretrain`` -> the flow object (imported as ``flows.stages``)."""
    file, _, name = entrypoint.partition(":")
    module = importlib.import_module(Path(file).with_suffix("").as_posix().replace("/", "."))
    return getattr(module, name)


def build_deployments(path: str | Path = ROOT / "prefect.yaml") -> list:
    from prefect.schedules import Cron

    deployments = []
    for spec in deployment_specs(path):
        schedules = [
            Cron(s["cron"], timezone=s.get("timezone"), active=bool(s.get("active", True)))
            for s in spec.get("schedules") or []
            if "cron" in s
        ]
        deployments.append(
            load_flow(spec["entrypoint"]).to_deployment(
                name=spec["name"],
                parameters=spec.get("parameters") or {},
                description=spec.get("description"),
                tags=spec.get("tags"),
                schedules=schedules,
            )
        )
    return deployments


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefect-yaml", default=str(ROOT / "prefect.yaml"))
    parser.add_argument("--limit", type=int, default=1, help="flow runs at a time (default 1: one GPU job)")
    args = parser.parse_args(argv)
    from prefect import serve

    serve(*build_deployments(args.prefect_yaml), limit=args.limit)


if __name__ == "__main__":
    main()
