"""Typed settings of the ``mlflow`` and ``register*`` sections of ``params.yaml``, validated on load.

Each finetuned task registers its own model: ``register`` (retrieval, the section's historical name),
``register_vqa``, ``register_ve`` and ``register_nlvr``; a section left out takes its task's defaults."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from albef.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, ConfigError, build_dataclass, check_ranges
from albef.tasks import REGISTER_TASKS, TASKS, check_task
from albef.tracking.redact import redact_uri

# The schemes MLflow's tracking client understands. Anything else (a typo such as ``htp://``) would only
# fail at the first request, deep inside training, so it is refused before anything starts.
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SYSTEM_METRICS_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"
# Registered-model names end up in ``models:/<name>@<alias>`` URIs, REST paths and file names; this
# strict set keeps all of them unambiguous (MLflow itself only refuses '/' and ':').
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}")
_ALIAS = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,254}")

#: task -> its registration section of params.yaml
REGISTER_SECTIONS = {name: TASKS[name].register_section for name in REGISTER_TASKS}
# What each task's finetune and evaluate stages write, and the headline metric of its evaluation (the key
# albef.eval.vqa.score_predictions / albef.eval.classify.accuracy_metrics put in metrics/<task>.json).
_REGISTER_DEFAULTS: dict[str, dict[str, Any]] = {
    "retrieval": {},  # the dataclass defaults
    **{
        task: {
            "model_name": f"albef-{task}",
            "model_dir": f"models/{task}",
            "metrics": f"metrics/{task}.json",
            "gate": {"metric": "accuracy"},
        }
        for task in REGISTER_TASKS
        if task != "retrieval"  # every other evaluation writes "accuracy" (albef.eval.grounding too)
    },
}


@dataclass
class TrackingConfig:
    """``params.mlflow``: where runs go and how a flaky server is handled."""

    enabled: bool = True
    tracking_uri: str = DEFAULT_TRACKING_URI  # MLFLOW_TRACKING_URI, when set, takes precedence
    experiment: str = "albef"
    # for a new experiment; null: the server's default, or ./mlruns beside a sqlite store in the project, stored
    # relative to the project so that moving it keeps every artifact link (albef.tracking.store)
    artifact_location: str | None = None
    spool_dir: str = "runs/mlflow-spool"  # undelivered tracking calls, replayed by `albef mlflow sync`
    # seconds per HTTP request: a dead server must not stall training
    request_timeout: int = field(default=10, metadata=AT_LEAST_ONE)
    # MLflow's own retries per request (its default, 7, waits minutes)
    request_retries: int = field(default=1, metadata=NON_NEGATIVE)
    # seconds between delivery attempts while the server is unreachable
    retry_every: float = field(default=30.0, metadata=NON_NEGATIVE)
    log_artifacts: bool = True
    # CPU, memory, disk and network (GPUs too when NVML, the nvidia-ml-py package, is installed) sampled into
    # ``system/*`` metrics of every stage run, by rank 0; MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING, when set, wins
    system_metrics: bool = True
    # seconds; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, when set, wins
    system_metrics_interval: float = field(default=10.0, metadata=POSITIVE)

    def __post_init__(self) -> None:
        if not isinstance(self.experiment, str) or not self.experiment.strip():
            raise ConfigError("mlflow.experiment: expected a non-empty name")
        check_ranges(self, "mlflow")

    def resolved_uri(self) -> str:
        """The tracking URI in force: ``MLFLOW_TRACKING_URI`` when set, else ``tracking_uri``; validated."""
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri
        source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "mlflow.tracking_uri"
        return validate_tracking_uri(uri, source)

    def system_metrics_on(self) -> bool:
        """Whether stage runs sample system metrics: ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` when set (MLflow's own
        switch, which runs created through the client would otherwise ignore), else ``system_metrics``."""
        raw = os.environ.get(SYSTEM_METRICS_ENV, "").strip()
        if not raw:
            return self.system_metrics
        if raw.lower() in ("true", "1"):
            return True
        if raw.lower() in ("false", "0"):
            return False
        raise ConfigError(f"{SYSTEM_METRICS_ENV}: expected true or false, got {raw!r}")


@dataclass
class GateConfig:
    """When a challenger may take the ``champion`` alias."""

    metric: str = "r_mean"  # a key of the evaluation metrics JSON (nested keys joined by '.': itc.r_mean)
    direction: str = "maximize"  # or minimize
    # over the champion, in the metric's units; 0: not worse
    min_improvement: float = field(default=0.0, metadata=NON_NEGATIVE)
    min_value: float | None = None  # the challenger must reach this (maximize) or stay below it (minimize)

    def __post_init__(self) -> None:
        if self.direction not in ("maximize", "minimize"):
            raise ConfigError(f"gate.direction: expected maximize or minimize, got {self.direction!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError("gate.metric: expected a metric name")
        check_ranges(self, "gate")


@dataclass
class RegisterConfig:
    """``params.register`` (``register_<task>``): which model and metrics become a registry version, and the
    promotion gate."""

    model_name: str = "albef-retrieval"
    model_dir: str = "models/retrieval"
    metrics: str = "metrics/retrieval.json"
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    gate: GateConfig = field(default_factory=GateConfig)
    task: str = "retrieval"  # the pyfunc the model is logged as; register_config sets it from the section

    def __post_init__(self) -> None:
        check_task(self.task, REGISTER_TASKS, "register task")
        name = self.section
        if isinstance(self.gate, dict):
            try:
                self.gate = build_dataclass(GateConfig, self.gate, f"{name}.gate")
            except ConfigError as exc:
                text = str(exc)
                raise ConfigError(text if text.startswith(name) else f"{name}.{text}") from exc
        validate_model_name(self.model_name, f"{name}.model_name")
        for key in ("champion_alias", "challenger_alias"):
            validate_alias(getattr(self, key), f"{name}.{key}")
        if self.champion_alias == self.challenger_alias:
            raise ConfigError(f"{name}: champion_alias and challenger_alias must differ")

    @property
    def section(self) -> str:
        """Its params.yaml section (and DVC stage): ``register`` for retrieval, else ``register_<task>``."""
        return REGISTER_SECTIONS[self.task]


def validate_tracking_uri(uri: str, source: str = "tracking URI") -> str:
    """``uri`` when MLflow can use it, else a :class:`ConfigError` that shows it with its credentials redacted."""
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"{source}: empty tracking URI")
    parsed = urlparse(uri)
    shown = redact_uri(uri)
    scheme = parsed.scheme.split("+")[0].lower()  # postgresql+psycopg2:// is a SQLAlchemy URI
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(
            f"{source}: {shown!r} is not a tracking URI MLflow can use (scheme {parsed.scheme or 'missing'!r}); "
            f"expected one of {', '.join(s + '://' for s in TRACKING_SCHEMES)}, e.g. {DEFAULT_TRACKING_URI} "
            "or http://127.0.0.1:5000"
        )
    if scheme in ("http", "https") and not parsed.hostname:
        raise ConfigError(f"{source}: {shown!r} has no host (expected e.g. http://127.0.0.1:5000)")
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise ConfigError(f"{source}: {shown!r}: a sqlite URI needs three slashes, e.g. sqlite:///mlflow.db")
    return uri


def validate_model_name(name: str, source: str = "model name") -> str:
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        bad = sorted({c for c in str(name) if not (c.isascii() and (c.isalnum() or c in "_.-"))})
        detail = f"forbidden character(s) {bad}" if bad else "it must start with a letter or digit"
        raise ConfigError(
            f"{source}: {name!r} is not a valid registered model name ({detail}); use letters, digits, "
            "'_', '.' and '-', at most 255 characters"
        )
    return name


def validate_alias(alias: str, source: str = "alias") -> str:
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias) or alias.lower() == "latest":
        raise ConfigError(
            f"{source}: {alias!r} is not a valid alias (letters, digits, '_' and '-', not starting with a "
            "digit; 'latest' is reserved)"
        )
    return alias


def tracking_config(params: dict[str, Any]) -> TrackingConfig:
    """The ``mlflow`` section. Without one, tracking is off: a params file written for a unit test or a
    one-off run then never creates a database in the working directory. The project's params.yaml has it."""
    if "mlflow" not in params:
        return TrackingConfig(enabled=False)
    return build_dataclass(TrackingConfig, {} if params["mlflow"] is None else params["mlflow"], "mlflow")


def register_config(params: dict[str, Any], task: str = "retrieval") -> RegisterConfig:
    """The registration settings of ``task``: its section (:data:`REGISTER_SECTIONS`) over the task's
    defaults (model ``albef-<task>``, ``models/<task>``, ``metrics/<task>.json``, gate on ``accuracy``)."""
    if task not in REGISTER_SECTIONS:
        raise ConfigError(
            f"no registration for task {task!r}; expected one of {', '.join(REGISTER_SECTIONS)}"
        )
    name = REGISTER_SECTIONS[task]
    values = {} if params.get(name) is None else params[name]
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(values).__name__}")
    if values.get("task", task) != task:
        raise ConfigError(f"{name}.task: this section registers {task} models, got {values['task']!r}")
    merged = {**_REGISTER_DEFAULTS[task], **values, "task": task}
    gate = values.get("gate")
    if isinstance(gate, dict) or gate is None:
        merged["gate"] = {**_REGISTER_DEFAULTS[task].get("gate", {}), **(gate or {})}
    return build_dataclass(RegisterConfig, merged, name)
