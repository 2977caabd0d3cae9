"""The model registry: each evaluated model becomes a version, and a gate decides who is ``champion``.

A new version gets the ``challenger`` alias and tags with its evaluation metrics (``metric.<name>``), data
version and git commit. The promotion gate (``params.register.gate``, ``register_<task>.gate``) compares the challenger's gate metric
with the champion's (read from the champion's tags, so the comparison needs no run lookups) and moves
``champion`` only when the challenger passes. The decision and its reason are written as tags on the
challenger either way, and the registered model keeps a ``champion_history`` tag (MLflow keeps no history of
aliases), which ``rollback`` uses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from albef.config import ConfigError, flatten
from albef.tasks import REGISTER_TASKS, TASKS
from albef.tracking.config import GateConfig, RegisterConfig, validate_alias, validate_model_name
from albef.tracking.provenance import numeric_items

log = logging.getLogger(__name__)

METRIC_TAG = "metric."
DECISION_TAG = "promotion_decision"
REASON_TAG = "promotion_reason"
HISTORY_TAG = "champion_history"  # on the registered model: versions that held champion, oldest first
DESCRIPTIONS = {name: TASKS[name].description for name in REGISTER_TASKS}


class RegistryError(RuntimeError):
    """A registry operation that cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    challenger_value: float
    champion_version: str | None = None
    champion_value: float | None = None


def gate_metric(
    metrics: dict[str, Any],
    gate: GateConfig,
    source: str = "evaluation metrics",
    section: str = "register",
) -> float:
    """The gate metric's value in (flattened) ``metrics``; a clear error when evaluation did not produce it."""
    flat = numeric_items(flatten(metrics))
    if gate.metric not in flat:
        raise ConfigError(
            f"{section}.gate.metric {gate.metric!r} is not in the {source}; available: {', '.join(sorted(flat))}"
        )
    value = flat[gate.metric]
    if not math.isfinite(value):
        raise RegistryError(f"{source}: {gate.metric} is {value}; a non-finite metric cannot be gated")
    return value


def decide(gate: GateConfig, value: float, champion: tuple[str, float] | None) -> Decision:
    """Pure gate logic: the required minimum first, then the improvement over the champion, if any."""
    sign = 1.0 if gate.direction == "maximize" else -1.0
    better = "at least" if gate.direction == "maximize" else "at most"
    if gate.min_value is not None and sign * (value - gate.min_value) < 0:
        return Decision(
            False, f"{gate.metric}={value:g} misses the required {better} {gate.min_value:g}", value
        )
    if champion is None:
        return Decision(True, f"no champion yet; {gate.metric}={value:g} passes the gate", value)
    version, current = champion
    gain = sign * (value - current)
    verdict = gain >= gate.min_improvement
    relation = "improves on" if gain > 0 else ("ties" if gain == 0 else "is worse than")
    reason = (
        f"{gate.metric}={value:g} {relation} champion v{version} ({current:g}) by {gain:+g}; "
        f"the gate needs {gate.min_improvement:+g} or more ({gate.direction})"
    )
    return Decision(verdict, reason, value, version, current)


class Registry:
    """Registry operations on one registered model name."""

    def __init__(self, cfg: RegisterConfig, tracking_uri: str | None = None):
        from mlflow import MlflowClient

        self.cfg = cfg
        self.name = validate_model_name(cfg.model_name, "model name")
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # -- lookups ------------------------------------------------------------------------------------------
    def _exists(self) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def history(self) -> list[str]:
        if not self._exists():
            return []
        raw = self.client.get_registered_model(self.name).tags.get(HISTORY_TAG, "")
        return [v for v in raw.split(",") if v]

    def version(self, version: str | int):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(
                    f"{self.name} has no version {version} (it was never created or was deleted)"
                ) from exc
            raise

    def holder(self, alias: str):
        """The version holding ``alias``, or None. An alias whose version was deleted is an error, found through
        the champion history (MLflow drops the alias with the version, silently)."""
        from mlflow.exceptions import MlflowException

        validate_alias(alias, "alias")
        if not self._exists():
            return None
        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
        if alias == self.cfg.champion_alias:
            past = self.history()
            if past:
                raise RegistryError(
                    f"alias {alias!r} of {self.name} pointed to version {past[-1]}, which was deleted; choose a "
                    f"champion with `albef registry promote --version N --force` or `albef registry rollback --to N`"
                )
        return None

    def champion_value(self, mv) -> float:
        key = METRIC_TAG + self.cfg.gate.metric
        if key not in mv.tags:
            raise RegistryError(
                f"champion v{mv.version} of {self.name} has no {key!r} tag to compare with (it was registered "
                f"with metrics {sorted(k for k in mv.tags if k.startswith(METRIC_TAG))}); promote explicitly "
                "with `albef registry promote --version N --force`"
            )
        return float(mv.tags[key])

    # -- changes ------------------------------------------------------------------------------------------
    def _set_champion(self, version: str) -> None:
        self.client.set_registered_model_alias(self.name, self.cfg.champion_alias, version)
        past = [v for v in self.history() if v != version] + [version]
        self.client.set_registered_model_tag(self.name, HISTORY_TAG, ",".join(past[-50:]))

    def _record(self, version: str, decision: str, reason: str) -> None:
        self.client.set_model_version_tag(self.name, version, DECISION_TAG, decision)
        self.client.set_model_version_tag(self.name, version, REASON_TAG, reason)

    def evaluate_gate(self, value: float) -> Decision:
        champion = self.holder(self.cfg.champion_alias)
        current = (str(champion.version), self.champion_value(champion)) if champion is not None else None
        return decide(self.cfg.gate, value, current)

    def apply(self, version: str, decision: Decision) -> Decision:
        """Move ``champion`` to ``version`` when ``decision`` says so; the decision is recorded either way.
        A failure while moving the alias leaves the current champion in place and is recorded as such."""
        if not decision.promote:
            self._record(version, "rejected", decision.reason)
            log.info(
                "registry: %s v%s stays %s: %s",
                self.name,
                version,
                self.cfg.challenger_alias,
                decision.reason,
            )
            return decision
        try:
            self._set_champion(version)
        except Exception as exc:
            self._record(
                version, "failed", f"{decision.reason}; moving {self.cfg.champion_alias!r} failed: {exc}"
            )
            raise RegistryError(
                f"promoting {self.name} v{version} failed ({exc}); the champion is unchanged"
            ) from exc
        self._record(version, "promoted", decision.reason)
        log.info(
            "registry: %s v%s is now %s: %s", self.name, version, self.cfg.champion_alias, decision.reason
        )
        return decision

    def register(
        self,
        model_uri: str,
        metrics: dict[str, Any],
        tags: dict[str, str],
        run_id: str | None = None,
        model_id: str | None = None,
    ):
        """A new version from ``model_uri`` with the challenger alias, its metrics and ``tags``; then the gate.
        Returns (model version, decision)."""
        value = gate_metric(metrics, self.cfg.gate, section=self.cfg.section)
        # An unusable champion (deleted version, missing metric) fails here, before anything is created.
        self.evaluate_gate(value)
        if not self._exists():
            self.client.create_registered_model(
                self.name,
                description=f"ALBEF {DESCRIPTIONS[self.cfg.task]} (albef register --task {self.cfg.task})",
            )
        version_tags = {
            **{METRIC_TAG + k: f"{v:.6g}" for k, v in numeric_items(flatten(metrics)).items()},
            **tags,
        }
        if model_id is None and model_uri.startswith("models:/m-"):
            model_id = model_uri.removeprefix("models:/")  # a REST store needs the logged model's id
        mv = self.client.create_model_version(
            self.name, model_uri, run_id=run_id, tags=version_tags, model_id=model_id
        )
        version = str(mv.version)
        self.client.set_registered_model_alias(self.name, self.cfg.challenger_alias, version)
        decision = self.apply(version, self.evaluate_gate(value))
        return self.version(version), decision

    def promote(self, version: str | int, force: bool = False) -> Decision:
        """Run the gate for an existing version against the current champion (``force``: skip the gate)."""
        mv = self.version(version)
        if force:
            return self.apply(
                str(mv.version), Decision(True, "promoted by hand (--force), gate skipped", float("nan"))
            )
        key = METRIC_TAG + self.cfg.gate.metric
        if key not in mv.tags:
            raise RegistryError(
                f"v{mv.version} has no {key!r} tag; use --force to promote it without the gate"
            )
        champion = self.holder(self.cfg.champion_alias)
        if champion is not None and str(champion.version) == str(mv.version):
            return Decision(
                True, f"v{mv.version} already holds {self.cfg.champion_alias!r}", float(mv.tags[key])
            )
        return self.apply(str(mv.version), self.evaluate_gate(float(mv.tags[key])))

    def rollback(self, to: str | int | None = None) -> str:
        """Give ``champion`` back to version ``to`` (default: the previous champion still registered)."""
        past = self.history()
        try:
            holder = self.holder(self.cfg.champion_alias)
            current = str(holder.version) if holder is not None else None
        except RegistryError:
            current = None  # the champion was deleted: rolling back is the way out
        if to is None:
            target = None
            for v in (v for v in reversed(past) if v != current):
                with contextlib.suppress(RegistryError):  # a deleted version is skipped
                    self.version(v)
                    target = v
                    break
            if target is None:
                raise RegistryError(
                    f"{self.name}: no earlier champion to roll back to (history: {past or 'empty'})"
                )
        else:
            target = str(self.version(to).version)
        self._set_champion(target)
        self._record(target, "rollback", f"champion rolled back from v{current} to v{target}")
        return target

    def list(self) -> list[dict[str, Any]]:
        if not self._exists():
            return []
        versions = self.client.search_model_versions(f"name = '{self.name}'")
        rows = []
        for mv in sorted(versions, key=lambda m: int(m.version)):
            full = self.client.get_model_version(self.name, mv.version)  # search results omit aliases
            rows.append(
                {
                    "version": str(full.version),
                    "aliases": list(full.aliases),
                    self.cfg.gate.metric: full.tags.get(METRIC_TAG + self.cfg.gate.metric),
                    "decision": full.tags.get(DECISION_TAG),
                    "reason": full.tags.get(REASON_TAG),
                    "data_version": full.tags.get("data_version"),
                    "git_commit": full.tags.get("git_commit"),
                    "run_id": full.run_id,
                }
            )
        return rows


def read_metrics(path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the evaluation stage first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: malformed metrics JSON ({exc})") from exc
