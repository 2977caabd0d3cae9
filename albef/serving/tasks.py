"""VQA, SNLI-VE and NLVR2 models as MLflow pyfuncs, packaged as the retrieval one (:mod:`albef.serving.pyfunc`).

One request row is one question, and every row needs every input column; images are file paths or base64 image
files, as for retrieval. Inputs and outputs (a table, one row per request row):

=======  =======================================  ============================================================
task     input columns                            output columns
=======  =======================================  ============================================================
vqa      ``image``, ``question``                  ``answer`` (the best), ``answers`` and ``scores`` (the top
                                                  answers of the answer list, best first, and their probabilities)
ve       ``image``, ``hypothesis``                ``label`` (entailment, neutral, contradiction), ``probability``
                                                  (of the label), ``prob_<class>`` for every class
nlvr     ``left_image``, ``right_image``,         ``label`` (True, False), ``probability``, ``prob_False``,
         ``text``                                 ``prob_True``
=======  =======================================  ============================================================

The model's settings (``model_config``) are the ones its evaluation used (:func:`serving_config`).
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from albef.serving.pyfunc import (
    DEFAULT_LIMITS,
    MODEL_ARTIFACT,
    InputLimits,
    InvalidModelInput,
    RetrievalModel,
    as_table,
    bad_input,
    check_text_cell,
    decode_image,
    example_png,
    log_albef_model,
    log_retrieval_model,
    present,
    without_limits,
)
from albef.tasks import TASKS

TASK_COLUMNS: dict[str, tuple[str, ...]] = {
    "vqa": ("image", "question"),
    "ve": ("image", "hypothesis"),
    "nlvr": ("left_image", "right_image", "text"),
}
IMAGE_COLUMNS = ("image", "left_image", "right_image")


def read_rows(frame, columns: tuple[str, ...], limits: InputLimits = DEFAULT_LIMITS) -> dict[str, list]:
    """Per column, its values (images decoded); an empty request or an empty cell is InvalidModelInput."""
    frame = as_table(frame, columns)
    if len(frame) == 0:
        raise InvalidModelInput(f"empty request: expected rows with columns {list(columns)}")
    out: dict[str, list] = {}
    for column in columns:
        values = frame[column].tolist()
        for row, value in enumerate(values):
            if not present(value):
                raise InvalidModelInput(
                    f"row {row}, column {column!r}: empty; every row needs {list(columns)}"
                )
            if column not in IMAGE_COLUMNS:
                check_text_cell(value, row, column, limits)
        if column in IMAGE_COLUMNS:
            values = [decode_image(v, row, column, limits) for row, v in enumerate(values)]
        out[column] = values
    return out


class TaskModel(mlflow.pyfunc.PythonModel, metaclass=abc.ABCMeta):
    """A task's pyfunc: the predictor of :mod:`albef.serving.predict` on the ``albef_model`` artifact."""

    task: str = ""

    def load_context(self, context) -> None:
        from albef.serving.predict import PREDICTORS

        settings = dict(context.model_config or {})
        self.limits = InputLimits.from_config(settings)
        self.predictor = PREDICTORS[self.task](
            Path(context.artifacts[MODEL_ARTIFACT]), **without_limits(settings)
        )

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        from albef.serving.predict import BadInput

        try:
            return self.answer(read_rows(model_input, TASK_COLUMNS[self.task], self.limits))
        except (InvalidModelInput, BadInput) as exc:
            raise bad_input(str(exc)) from exc

    @abc.abstractmethod
    def answer(self, columns: dict[str, list]):
        """The output frame for the request's decoded ``columns`` (each task's pyfunc answers its own way)."""


class VQAModel(TaskModel):
    task = "vqa"

    def answer(self, columns: dict[str, list]):
        import pandas as pd

        tops = self.predictor(columns["image"], columns["question"])
        return pd.DataFrame(
            {
                "answer": [top[0][0] for top in tops],
                "answers": [[a for a, _ in top] for top in tops],
                "scores": [[p for _, p in top] for top in tops],
            }
        )


class ClassifierModel(TaskModel):
    def answer(self, columns: dict[str, list]):
        import pandas as pd

        *image_columns, text_column = TASK_COLUMNS[self.task]
        images = list(zip(*(columns[c] for c in image_columns), strict=True))
        results = self.predictor(images, columns[text_column])
        table: dict[str, list] = {
            "label": [r["label"] for r in results],
            "probability": [r["probability"] for r in results],
        }
        for name in self.predictor.labels:
            table[f"prob_{name}"] = [r["probabilities"][name] for r in results]
        return pd.DataFrame(table)


class VEModel(ClassifierModel):
    task = "ve"


class NLVRModel(ClassifierModel):
    task = "nlvr"


MODELS: dict[str, type[TaskModel]] = {"vqa": VQAModel, "ve": VEModel, "nlvr": NLVRModel}


class ServedModel(mlflow.pyfunc.PythonModel):
    """The pyfunc every registered albef model is (set by :mod:`albef.serving.model_code`): when it loads, it
    becomes the pyfunc of the task its exported model holds (``config.json`` of the ``albef_model``
    artifact: retrieval, which grounding models are too, VQA, SNLI-VE or NLVR2)."""

    def load_context(self, context) -> None:
        from albef.model_files import read_config

        task, _ = read_config(Path(context.artifacts[MODEL_ARTIFACT]))
        self.model = RetrievalModel() if task == "retrieval" else MODELS[_check_task(task)]()
        self.model.load_context(context)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        return self.model.predict(context, model_input, params)


_EXAMPLE_TEXT = {
    "question": "what color is the square",
    "hypothesis": "there is a red square",
    "text": "the left image has a red square",
}


def example_input(task: str):
    """One row: small PNGs (base64, a red one on the left) and a text."""
    import pandas as pd

    colors = {"image": (200, 30, 30), "left_image": (200, 30, 30), "right_image": (30, 30, 200)}
    return pd.DataFrame(
        {c: [example_png(colors[c])] if c in colors else [_EXAMPLE_TEXT[c]] for c in TASK_COLUMNS[task]}
    )


def _ranks_pairs(task: str) -> bool:
    """Whether ``task`` exports a retrieval model (grounding does too), whose pyfunc ranks image-text pairs."""
    entry = TASKS.get(task)
    return entry is not None and entry.model == "retrieval"


def _check_task(task: str) -> str:
    if task not in MODELS:
        raise ValueError(f"no pyfunc model for task {task!r}; available: retrieval, {', '.join(MODELS)}")
    return task


def serving_config(params: dict[str, Any], task: str) -> dict[str, Any]:
    """The pyfunc's settings for ``task``: those of its evaluation section in ``params`` (``evaluate``,
    ``evaluate_vqa``, ``evaluate_<task>``), so the registered model answers as it was evaluated."""
    from albef.config import build_dataclass

    if _ranks_pairs(task):
        return {"max_tokens": int((params.get("evaluate") or {}).get("max_tokens", 30))}
    if task == "vqa":
        from albef.eval.settings import VQAEvalConfig

        cfg = build_dataclass(VQAEvalConfig, params.get("evaluate_vqa") or {}, "evaluate_vqa")
        return {"k": cfg.k_test, "max_words": cfg.max_words}
    from albef.eval.settings import ClassifierEvalConfig

    name = TASKS[_check_task(task)].eval_section
    cfg = build_dataclass(ClassifierEvalConfig, params.get(name) or {}, name)
    return {"max_tokens": cfg.max_tokens, "max_words": cfg.max_words}


def log_task_model(task: str, model_dir: str | Path, name: str = "model", **settings: Any):
    """Log the exported ``task`` model in ``model_dir`` as its pyfunc (retrieval: :class:`RetrievalModel`) with
    ``settings`` as its model config. Returns MLflow's ``ModelInfo``."""
    if _ranks_pairs(task):
        return log_retrieval_model(model_dir, name=name, **settings)
    from albef.eval.settings import ANSWER_LIST_FILE

    return log_albef_model(
        model_dir,
        _check_task(task),
        TASK_COLUMNS[task],
        example_input(task),
        settings,
        name=name,
        required=(ANSWER_LIST_FILE,) if task == "vqa" else (),
    )
