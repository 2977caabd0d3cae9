"""What a flow run is asked to do, checked before any stage runs.

* :func:`select_stages`: DVC stage names, flow names (``data``, ``preprocess``, ``pretrain``, ``finetune``,
  ``evaluate``, ``register``) or ``flow:<name>`` -> the DVC stages to run, in ``dvc.yaml`` order. A name that
  is both a DVC stage and a flow (``preprocess``, ``pretrain``, ``register``) means the DVC stage (with what
  it needs, as ``dvc repro`` runs it); ``flow:register`` means every stage of the register flow.
* :func:`merge_overrides`: ``{"pretrain.epochs": 2}`` (or nested ``{"pretrain": {"epochs": 2}}``) merged
  into the params; a key that neither ``params.yaml`` nor the section's typed config knows fails and is
  named, and the touched sections are validated by the same loaders the stages use.
  :func:`apply_overrides` writes them into a ``params.yaml``: a flow run's own workspace's, never the
  checkout's (:mod:`albef.orchestration.workspace`).
* :func:`check_resources` / :func:`launch_env`: GPUs and nodes; a worker that has fewer GPUs than asked
  fails at once with that reason.
"""

from __future__ import annotations

import copy
import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from albef.config import ConfigError
from albef.sections import section_reader

# flow name -> the DVC stages it runs (patterns), in pipeline order. A dvc.yaml stage no pattern names runs
# with the flow of the next stage that is named (it is that stage's prerequisite), so no stage is skipped.
FLOW_STAGES: dict[str, tuple[str, ...]] = {
    "data": ("synth",),
    "preprocess": ("preprocess",),
    "pretrain": ("unimodal", "pretrain"),  # the unimodal warm start of the encoders, then ALBEF pretraining
    "finetune": ("finetune_*",),
    "evaluate": ("evaluate_*",),
    # retrieval's model, then one per downstream task, then the one-screen summary of every task
    "register": ("register", "register_*", "summary"),
}


class PlanError(ConfigError):
    """A flow run asked for something the project does not have (a stage, a key, GPUs)."""


MODES = ("auto", "checkout", "experiment")  # where a flow run works (albef.orchestration.workspace)


def choose_mode(mode: str, overrides: Any) -> str:
    """``auto``: an experiment workspace when there are overrides, else the checkout. ``checkout`` with
    overrides is refused: a flow never writes the checkout's params.yaml."""
    if mode not in MODES:
        raise PlanError(f"workspace: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        return "experiment" if overrides else "checkout"
    if mode == "checkout" and overrides:
        raise PlanError(
            "workspace='checkout' with overrides: a flow never writes the checkout's params.yaml (concurrent "
            "runs would run with each other's settings); use workspace='experiment' (the default with "
            "overrides), or edit and commit params.yaml and run without overrides"
        )
    return mode


def dvc_stages(project: str | Path) -> list[str]:
    """The stage names ``dvc.yaml`` declares, in its order."""
    path = Path(project) / "dvc.yaml"
    if not path.is_file():
        raise PlanError(f"no dvc.yaml in {Path(project).resolve()} (project_dir must be the albef checkout)")
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    return list(stages)


def _claimed(stage: str) -> str | None:
    for flow, patterns in FLOW_STAGES.items():
        if any(fnmatch.fnmatchcase(stage, p) for p in patterns):
            return flow
    return None


def flow_of(stage: str, declared: list[str] | None = None) -> str | None:
    """The flow that runs DVC stage ``stage``: the one whose patterns name it, else (given ``declared``, the
    dvc.yaml order) the flow of the next named stage, else of the last one before it."""
    flow = _claimed(stage)
    if flow is not None or not declared or stage not in declared:
        return flow
    at = declared.index(stage)
    later = [_claimed(s) for s in declared[at + 1 :]]
    earlier = [_claimed(s) for s in reversed(declared[:at])]
    return next((f for f in later + earlier if f is not None), None)


FLOW_PREFIX = "flow:"


def stage_choices(declared: list[str]) -> list[str]:
    """Every name :func:`select_stages` accepts: the DVC stages, the flows that are not also a stage, and
    ``flow:<name>`` for every flow."""
    flows = [f for f in FLOW_STAGES if f not in declared]
    return [*declared, *flows, *(f"{FLOW_PREFIX}{f}" for f in FLOW_STAGES)]


def select_stages(project: str | Path, requested: list[str] | None = None) -> list[str]:
    """The DVC stages to run for ``requested`` (DVC stage names, flow names, ``flow:<name>``; None: every
    flow's stages).

    A DVC stage name wins over a flow of the same name: ``register`` is the DVC stage register (the
    retrieval model), ``flow:register`` the register flow's stages. The result follows ``dvc.yaml``'s order
    whatever the order asked. Unknown names fail, naming them and what exists; a flow none of whose stages
    ``dvc.yaml`` declares fails when asked for by name.
    """
    declared = dvc_stages(project)
    if requested is None:
        return [s for s in declared if flow_of(s, declared) is not None]
    if isinstance(requested, str):
        requested = [requested]
    chosen: set[str] = set()
    for asked in requested:
        name = asked.removeprefix(FLOW_PREFIX) if isinstance(asked, str) else asked
        if name in declared and not asked.startswith(FLOW_PREFIX):
            chosen.add(name)
        elif name in FLOW_STAGES:
            found = [s for s in declared if flow_of(s, declared) == name]
            if not found:
                raise PlanError(
                    f"stage {name!r}: dvc.yaml declares none of its DVC stages "
                    f"({', '.join(FLOW_STAGES[name])}); dvc.yaml has {', '.join(declared)}"
                )
            chosen.update(found)
        else:
            raise PlanError(
                f"unknown stage {asked!r}: expected a dvc.yaml stage ({', '.join(declared)}), a flow "
                f"({', '.join(FLOW_STAGES)}) or flow:<flow>"
            )
    return [s for s in declared if s in chosen]


# ---------------------------------------------------------------------------------------------- overrides


def _flatten(overrides: Mapping[str, Any]) -> list[tuple[tuple[str, ...], Any]]:
    """``{"pretrain.epochs": 2}`` and ``{"pretrain": {"epochs": 2}}`` -> ``[(("pretrain", "epochs"), 2)]``.

    Top-level keys are dotted paths; keys inside a nested mapping are taken as they are (file names such as
    ``retrieval_train.json`` in ``preprocess.files`` keep their dots)."""
    out: list[tuple[tuple[str, ...], Any]] = []

    def walk(path: tuple[str, ...], value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key, sub in value.items():
                if not isinstance(key, str) or not key:
                    raise PlanError(
                        f"override keys must be non-empty strings, got {key!r} in {'.'.join(path)}"
                    )
                walk((*path, key), sub)
        else:
            out.append((path, value))

    for key, value in overrides.items():
        if not isinstance(key, str) or not key or "" in key.split("."):
            raise PlanError(
                f"override keys must be dotted params.yaml keys such as pretrain.epochs, got {key!r}"
            )
        walk(tuple(key.split(".")), value)
    return out


_MISSING = object()


@dataclass
class OverrideResult:
    params: dict[str, Any]  # params.yaml after the overrides
    changes: list[tuple[tuple[str, ...], Any, Any]] = field(default_factory=list)  # (path, old, new)

    @property
    def changed(self) -> dict[str, tuple[Any, Any]]:
        """``{"pretrain.epochs": (3, 1)}``: only the keys whose value really changed."""
        return {".".join(path): (old, new) for path, old, new in self.changes}


def merge_overrides(params: dict[str, Any], overrides: Mapping[str, Any] | None) -> OverrideResult:
    """``params`` with ``overrides`` applied and validated; nothing is written."""
    merged = copy.deepcopy(params)
    result = OverrideResult(merged)
    if not overrides:
        return result
    if not isinstance(overrides, Mapping):
        raise PlanError(f"overrides must be a mapping of params.yaml keys to values, got {overrides!r}")
    touched: dict[str, list[str]] = {}
    for path, value in _flatten(overrides):
        key = ".".join(path)
        section_name = path[0]
        if not isinstance(merged.get(section_name), dict):
            raise PlanError(
                f"override {key!r}: params.yaml has no section {section_name!r} "
                f"(sections: {', '.join(k for k, v in merged.items() if isinstance(v, dict))})"
            )
        if len(path) == 1:
            raise PlanError(f"override {key!r}: name a key inside the section, e.g. {key}.<key>")
        typed = section_reader(section_name) is not None
        node = merged
        for depth, part in enumerate(path[:-1]):
            child = node.get(part, _MISSING)
            if child is _MISSING and typed:
                child = node[part] = {}  # a typed sub-section params.yaml leaves at its defaults
            if child is _MISSING:
                raise PlanError(f"override {key!r}: params.yaml has no key {'.'.join(path[: depth + 1])}")
            if not isinstance(child, dict):
                raise PlanError(f"override {key!r}: {'.'.join(path[: depth + 1])} is a value, not a section")
            node = child
        old = node.get(path[-1], _MISSING)
        if old is _MISSING and not typed:
            raise PlanError(f"override {key!r}: params.yaml has no key {key} (section {section_name!r})")
        if old is _MISSING or old != value:
            node[path[-1]] = copy.deepcopy(value)
            result.changes.append((path, None if old is _MISSING else old, value))
        touched.setdefault(section_name, []).append(key)
    for section_name, keys in touched.items():
        validator = section_reader(section_name)
        if validator is None:
            continue
        try:
            validator(merged)
        except (ConfigError, TypeError, ValueError) as exc:
            raise PlanError(f"override {', '.join(map(repr, keys))}: {exc}") from exc
    return result


def apply_overrides(project: str | Path, overrides: Mapping[str, Any] | None) -> OverrideResult:
    """Validate ``overrides`` and write them into ``<project>/params.yaml`` (comments and layout kept), as
    ``dvc exp run -S`` does, so DVC sees them as the stages' params and ``dvc.lock`` records them."""
    from albef.config import read_params

    path = Path(project) / "params.yaml"
    result = merge_overrides(read_params(path), overrides)
    if not result.changes:
        return result
    from ruamel.yaml import YAML

    rt = YAML()  # round trip: comments, key order and flow style survive
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(float, _represent_float)
    doc = rt.load(path.read_text())
    for parts, _, value in result.changes:
        node = doc
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        rt.dump(doc, fh)
    # The stages read params.yaml with PyYAML (YAML 1.1): what they will read must be what was validated.
    written = read_params(tmp)
    for parts, _, value in result.changes:
        node: Any = written
        for part in parts:
            node = node.get(part) if isinstance(node, dict) else None
        if node != value:
            tmp.unlink()
            raise PlanError(f"override {'.'.join(parts)}: {value!r} would be read back as {node!r}")
    os.replace(tmp, path)
    return result


def _represent_float(representer, value: float):
    # PyYAML (YAML 1.1) reads 5e-05 as a string: write 5.0e-05, as PyYAML itself does
    text = repr(value).lower()
    if text in ("nan", "inf", "-inf"):
        text = {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}[text]
    elif "." not in text and "e" in text:
        text = text.replace("e", ".0e", 1)
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


# ---------------------------------------------------------------------------------------------- resources


def check_resources(gpus: int, nodes: int = 1, rdzv_endpoint: str | None = None) -> None:
    """Fail at once when this machine cannot run what was asked: fewer GPUs than ``gpus``, or several
    nodes without a rendezvous address."""
    if gpus < 0:
        raise PlanError(f"gpus: expected 0 (CPU, one process) or more, got {gpus}")
    if nodes < 1:
        raise PlanError(f"nodes: expected 1 or more, got {nodes}")
    if nodes > 1 and gpus < 1:
        raise PlanError(f"nodes={nodes}: training on several nodes needs gpus >= 1 per node")
    if nodes > 1 and not rdzv_endpoint:
        raise PlanError(f"nodes={nodes}: set rdzv_endpoint to host:port of the first node")
    if gpus == 0:
        return
    import torch

    seen = torch.cuda.device_count()
    if seen < gpus:
        raise PlanError(
            f"requested {gpus} GPU(s) per node, but this worker sees {seen} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}, torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}); run it on a GPU worker of the "
            "albef-gpu pool or with gpus=0"
        )


def launch_env(gpus: int, nodes: int = 1, rdzv_endpoint: str | None = None, rdzv_id: str = "albef"):
    """Environment for the stage commands: several processes per node (or several nodes) make
    ``albef pretrain`` & co. re-execute themselves under torchrun (:mod:`albef.orchestration.launch`)."""
    from albef.orchestration.launch import ENV_NNODES, ENV_NPROC, ENV_RDZV_ENDPOINT, ENV_RDZV_ID

    if gpus <= 1 and nodes <= 1:
        return {}
    env = {ENV_NPROC: str(gpus), ENV_NNODES: str(nodes), ENV_RDZV_ID: rdzv_id}
    if rdzv_endpoint:
        env[ENV_RDZV_ENDPOINT] = rdzv_endpoint
    return env


@dataclass
class Plan:
    """What a flow run will do, decided before anything runs."""

    project: Path
    stages: list[str]  # the DVC stages to run, in order
    declared: list[str]  # every stage of dvc.yaml, in order (for flow_of)
    changed: dict[str, tuple[Any, Any]]
    params: dict[str, Any]  # params.yaml with the overrides (written only into an experiment workspace)
    env: dict[str, str]
    mode: str = "checkout"  # where the run works: "checkout" or "experiment" (albef.orchestration.workspace)


def prepare(
    project: str | Path,
    stages: list[str] | None,
    overrides: Mapping[str, Any] | None = None,
    gpus: int = 0,
    nodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "albef",
    workspace: str = "auto",
) -> Plan:
    """Every check a flow makes at its start, in order: stage names, GPUs, where it works, overrides
    (validated, not written: see :mod:`albef.orchestration.workspace`)."""
    from albef.config import read_params

    project = Path(project).resolve()
    selected = select_stages(project, stages)
    check_resources(gpus, nodes, rdzv_endpoint)
    mode = choose_mode(workspace, overrides)
    merged = merge_overrides(read_params(project / "params.yaml"), overrides)
    return Plan(
        project,
        selected,
        dvc_stages(project),
        merged.changed,
        merged.params,
        launch_env(gpus, nodes, rdzv_endpoint, rdzv_id),
        mode,
    )
