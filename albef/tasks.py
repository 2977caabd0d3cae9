"""The task registry: one entry per task, the one place the list of tasks stands.

An entry says what a task is made of: the model it builds and exports, its params.yaml sections (training,
evaluation, registration), the stage functions that train and evaluate it, the files its evaluation writes
that MLflow keeps, and its registry description. The CLI, the tracked stages (and so ``dvc.yaml`` and the
Prefect flows), registration and the params checks read it; adding a task is its modules and one entry here.

It is torch-free (the CLI starts and ``params.yaml`` is checked without loading a model): the stage functions
are named ``"module:function"`` and imported when a stage runs (:meth:`Task.train`, :meth:`Task.evaluate`).
Every training function is called as ``fn(params, task=, name=, progress=, on_log=)``, every evaluation
function as ``fn(params, task=, model_dir=, out_dir=, metrics_path=, progress=, name=)`` and every settings
reader as ``fn(params, task=, name=)`` (the typed settings the stage will use: the params checks call it).
"""

from __future__ import annotations

import functools
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from albef.config import FINETUNE_LOSS_KEYS, PRETRAIN_LOSS_KEYS, ConfigError


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    model: str  # the model it trains and exports (a model task of albef.checkpoint.TASKS)
    train_section: str | None  # its training stage's params.yaml section
    train_entry: str | None  # "module:function" of its training stage
    # "module:function" reading its training section into the typed settings its stage uses
    train_settings: str | None
    eval_section: str | None = None  # its evaluation's section
    eval_entry: str | None = None  # "module:function" of its evaluation
    eval_settings: str | None = None  # "module:function" reading its evaluation section, typed
    report_files: tuple[str, ...] = ()  # what its evaluation writes into the report folder, kept by MLflow
    register_section: str | None = None  # its registration section (albef register --task <name>)
    loss_keys: tuple[str, ...] = FINETUNE_LOSS_KEYS  # the loss switches its training section may set
    # "module:Class" of the MLflow pyfunc that serves the model it exports (None: not served), and of the
    # predictor that pyfunc and `albef predict` keep (None: the pyfunc scores on its own)
    pyfunc: str | None = None
    predictor: str | None = None

    def train(
        self, params: dict[str, Any], name: str | None = None, progress: bool = True, on_log=None
    ) -> dict[str, Any]:
        """Run the training stage with the settings of ``params[name]`` (default: :attr:`train_section`)."""
        stage = _resolve(self.train_entry, f"task {self.name!r} has no training stage")
        return stage(
            params, task=self.name, name=name or self.train_section, progress=progress, on_log=on_log
        )

    def evaluate(
        self,
        params: dict[str, Any],
        model_dir: str | Path,
        out_dir: str | Path,
        metrics_path: str | Path | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Evaluate the model in ``model_dir`` with the settings of :attr:`eval_section`."""
        stage = _resolve(self.eval_entry, f"no evaluation for task {self.name!r}")
        return stage(
            params,
            task=self.name,
            model_dir=model_dir,
            out_dir=out_dir,
            metrics_path=metrics_path,
            progress=progress,
            name=self.eval_section,
        )

    def pyfunc_class(self) -> type:
        """The pyfunc class of the model this task exports (grounding: the retrieval model's)."""
        served = TASKS.get(self.model)
        if served is None or served.pyfunc is None:
            available = ", ".join(name for name, task in TASKS.items() if task.pyfunc)
            raise ValueError(f"no pyfunc model for task {self.name!r}; available: {available}")
        return _resolve(served.pyfunc, "")

    def predictor_class(self) -> type:
        return _resolve(self.predictor, f"task {self.name!r} has no predictor")

    def section_readers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """Section name -> its typed reader (a function of the whole params), for each section this task has."""
        readers = {}
        for section, entry in (
            (self.train_section, self.train_settings),
            (self.eval_section, self.eval_settings),
        ):
            if section is not None and entry is not None:
                readers[section] = functools.partial(_read_section, entry, self.name, section)
        return readers


def _resolve(entry: str | None, missing: str) -> Callable[..., Any]:
    if entry is None:
        raise ValueError(missing)
    return pkgutil.resolve_name(entry)


def _read_section(entry: str, task: str, section: str, params: dict[str, Any]) -> Any:
    return _resolve(entry, "")(params, task=task, name=section)


_CONTRASTIVE = "albef.train.stages:train_stage"
_CONTRASTIVE_SETTINGS = "albef.train.stages:contrastive_train_settings"
_CLASSIFIER = "albef.train.classify:finetune_classifier_stage"
_CLASSIFIER_SETTINGS = "albef.train.classify:classifier_train_settings"
_CLASSIFIER_EVAL = "albef.eval.stages:evaluate_classifier_stage"
_CLASSIFIER_EVAL_SETTINGS = "albef.eval.settings:classifier_eval_settings"

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="pretrain",
            description="image-text pretraining (ITC, ITM, MLM)",
            model="pretrain",
            train_section="pretrain",
            train_entry=_CONTRASTIVE,
            train_settings=_CONTRASTIVE_SETTINGS,
            loss_keys=PRETRAIN_LOSS_KEYS,
        ),
        Task(
            name="retrieval",
            description="image-text retrieval",
            model="retrieval",
            train_section="finetune_retrieval",
            train_entry=_CONTRASTIVE,
            train_settings=_CONTRASTIVE_SETTINGS,
            eval_section="evaluate",  # the section's historical name
            eval_entry="albef.eval.stages:evaluate_retrieval_stage",
            eval_settings="albef.eval.settings:retrieval_eval_settings",
            report_files=("examples.png", "rankings.json"),
            register_section="register",
            pyfunc="albef.serving.pyfunc:RetrievalModel",
        ),
        Task(
            name="grounding",
            description="weakly supervised grounding (Grad-CAM over a retrieval model)",
            model="retrieval",  # the official Grounding.py finetunes the retrieval model on (image, expression)
            train_section="finetune_grounding",
            train_entry=_CONTRASTIVE,
            train_settings=_CONTRASTIVE_SETTINGS,
            eval_section="evaluate_grounding",
            eval_entry="albef.eval.stages:evaluate_grounding_stage",
            eval_settings="albef.eval.settings:grounding_eval_settings",
            report_files=("results.json", "examples", "examples.png"),
            register_section="register_grounding",
        ),
        Task(
            name="vqa",
            description="visual question answering",
            model="vqa",
            train_section="finetune_vqa",
            train_entry="albef.train.vqa:finetune_vqa_stage",
            train_settings="albef.train.vqa:vqa_train_settings",
            eval_section="evaluate_vqa",
            eval_entry="albef.eval.stages:evaluate_vqa_stage",
            eval_settings="albef.eval.settings:vqa_eval_settings",
            report_files=("vqa_result.json", "top_answers.json"),
            register_section="register_vqa",
            pyfunc="albef.serving.tasks:VQAModel",
            predictor="albef.serving.predict:VQAPredictor",
        ),
        Task(
            name="ve",
            description="visual entailment (SNLI-VE)",
            model="ve",
            train_section="finetune_ve",
            train_entry=_CLASSIFIER,
            train_settings=_CLASSIFIER_SETTINGS,
            eval_section="evaluate_ve",
            eval_entry=_CLASSIFIER_EVAL,
            eval_settings=_CLASSIFIER_EVAL_SETTINGS,
            report_files=("predictions.json",),
            register_section="register_ve",
            pyfunc="albef.serving.tasks:VEModel",
            predictor="albef.serving.predict:VEPredictor",
        ),
        Task(
            name="nlvr",
            description="visual reasoning on image pairs (NLVR2)",
            model="nlvr",
            train_section="finetune_nlvr",
            train_entry=_CLASSIFIER,
            train_settings=_CLASSIFIER_SETTINGS,
            eval_section="evaluate_nlvr",
            eval_entry=_CLASSIFIER_EVAL,
            eval_settings=_CLASSIFIER_EVAL_SETTINGS,
            report_files=("predictions.json",),
            register_section="register_nlvr",
            pyfunc="albef.serving.tasks:NLVRModel",
            predictor="albef.serving.predict:NLVRPredictor",
        ),
        Task(
            name="nlvr_ta",
            description="NLVR2 text-assignment pretraining on image pairs",
            model="nlvr_ta",
            train_section="pretrain_nlvr",
            train_entry=_CLASSIFIER,
            train_settings=_CLASSIFIER_SETTINGS,
            loss_keys=(),  # text assignment has no distillation and a single loss
        ),
    )
}

#: the models a task exports (albef.checkpoint.MODEL_CLASSES has their classes)
MODEL_TASKS = list(dict.fromkeys(task.model for task in TASKS.values()))
#: the tasks ``albef finetune`` trains (pretraining is ``albef pretrain``)
FINETUNE_TASKS = [name for name, task in TASKS.items() if task.train_entry and name != "pretrain"]
#: the tasks ``albef evaluate`` evaluates
EVAL_TASKS = [name for name, task in TASKS.items() if task.eval_entry]
#: the tasks ``albef register`` registers
REGISTER_TASKS = [name for name, task in TASKS.items() if task.register_section]


def check_task(task: str, allowed: tuple[str, ...] | list[str], kind: str = "task") -> None:
    """A stage function given a task it does not run fails here, naming the ones it does."""
    if task not in allowed:
        raise ConfigError(f"unknown {kind} {task!r}; available: {', '.join(allowed)}")


def get_task(name: str, kind: str = "task") -> Task:
    """The registry entry ``name``; an unknown name is a ValueError listing the known ones."""
    check_task(name, list(TASKS), kind)
    return TASKS[name]
