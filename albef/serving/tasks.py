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

from albef.config import build_dataclass
from albef.eval.settings import ANSWER_LIST_FILE, ClassifierEvalConfig, VQAEvalConfig
from albef.serving.pyfunc import (
    DEFAULT_LIMITS,
    MODEL_ARTIFACT,
    MODEL_CODE,
    InputLimits,
    InvalidModelInput,
    as_table,
    bad_input,
    check_text_cell,
    decode_image,
    example_png,
    pip_requirements,
    present,
    string_signature,
    without_limits,
)
from albef.tasks import TASKS, get_task

IMAGE_COLUMNS = ("image", "left_image", "right_image")
_EXAMPLE_TEXT = {
    "question": "what color is the square",
    "hypothesis": "there is a red square",
    "text": "the left image has a red square",
}
_EXAMPLE_COLORS = {"image": (200, 30, 30), "left_image": (200, 30, 30), "right_image": (30, 30, 200)}


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
    """A task's pyfunc: the task's predictor (named by the registry, :mod:`albef.serving.predict`) on the
    ``albef_model`` artifact."""

    task: str = ""
    columns: tuple[str, ...] = ()  # the request's columns, every one needed in every row
    required: tuple[str, ...] = ()  # files the exported model needs besides its weights and tokenizer

    def load_context(self, context) -> None:
        settings = dict(context.model_config or {})
        self.limits = InputLimits.from_config(settings)
        self.predictor = get_task(self.task).predictor_class()(
            Path(context.artifacts[MODEL_ARTIFACT]), **without_limits(settings)
        )

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        from albef.serving.predict import BadInput

        try:
            *images, texts = read_rows(model_input, self.columns, self.limits).values()
            # the predictor takes per text a tuple of its images (the image columns, in order)
            return self.answer(self.predictor(list(zip(*images, strict=True)), texts))
        except (InvalidModelInput, BadInput) as exc:
            raise bad_input(str(exc)) from exc

    @abc.abstractmethod
    def answer(self, results: list):
        """The output frame for the predictor's ``results`` (each task's pyfunc answers its own way)."""

    @classmethod
    def example(cls):
        """One row: small PNGs (base64, a red one on the left) and a text."""
        import pandas as pd

        return pd.DataFrame(
            {
                c: [example_png(_EXAMPLE_COLORS[c])] if c in _EXAMPLE_COLORS else [_EXAMPLE_TEXT[c]]
                for c in cls.columns
            }
        )


class VQAModel(TaskModel):
    task = "vqa"
    columns = ("image", "question")
    required = (ANSWER_LIST_FILE,)

    @staticmethod
    def settings(params: dict[str, Any]) -> dict[str, Any]:
        """The model config from ``params``: the VQA evaluation's candidates and word limit."""
        cfg = build_dataclass(VQAEvalConfig, params.get("evaluate_vqa") or {}, "evaluate_vqa")
        return {"k": cfg.k_test, "max_words": cfg.max_words}

    def answer(self, tops: list[list[tuple[str, float]]]):
        import pandas as pd

        return pd.DataFrame(
            {
                "answer": [top[0][0] for top in tops],
                "answers": [[a for a, _ in top] for top in tops],
                "scores": [[p for _, p in top] for top in tops],
            }
        )


class ClassifierModel(TaskModel):
    @classmethod
    def settings(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The model config from ``params``: the task's evaluation token and word limits."""
        name = TASKS[cls.task].eval_section
        cfg = build_dataclass(ClassifierEvalConfig, params.get(name) or {}, name)
        return {"max_tokens": cfg.max_tokens, "max_words": cfg.max_words}

    def answer(self, results: list[dict[str, Any]]):
        import pandas as pd

        table: dict[str, list] = {
            "label": [r["label"] for r in results],
            "probability": [r["probability"] for r in results],
        }
        for name in self.predictor.labels:
            table[f"prob_{name}"] = [r["probabilities"][name] for r in results]
        return pd.DataFrame(table)


class VEModel(ClassifierModel):
    task = "ve"
    columns = ("image", "hypothesis")


class NLVRModel(ClassifierModel):
    task = "nlvr"
    columns = ("left_image", "right_image", "text")


class ServedModel(mlflow.pyfunc.PythonModel):
    """The pyfunc every registered albef model is (set by :mod:`albef.serving.model_code`): when it loads, it
    becomes the pyfunc the registry names for the model its ``albef_model`` artifact holds (``config.json``:
    retrieval, which grounding models are too, VQA, SNLI-VE or NLVR2)."""

    def load_context(self, context) -> None:
        from albef.model_files import read_config

        task, _ = read_config(Path(context.artifacts[MODEL_ARTIFACT]))
        self.model = get_task(task).pyfunc_class()()
        self.model.load_context(context)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        return self.model.predict(context, model_input, params)


def serving_config(params: dict[str, Any], task: str) -> dict[str, Any]:
    """The pyfunc's settings for ``task``: those of its evaluation section in ``params`` (``evaluate``,
    ``evaluate_vqa``, ``evaluate_<task>``), so the registered model answers as it was evaluated."""
    return get_task(task).pyfunc_class().settings(params)


def log_task_model(task: str, model_dir: str | Path, name: str = "model", **settings: Any):
    """Log the exported ``task`` model in ``model_dir`` (model.safetensors, config.json, tokenizer/ and the files
    its pyfunc requires) as its pyfunc with ``settings`` as its model config (default: the pyfunc's own), a
    string signature of the pyfunc's columns and its input example; albef's source goes along, so the model
    loads with only the libraries of :func:`albef.serving.pyfunc.pip_requirements` installed.

    Logged as code (:data:`albef.serving.pyfunc.MODEL_CODE`, MLflow's "models from code"), not as a pickled
    ``python_model``: loading it runs no pickle, so a file swapped in the artifact store cannot smuggle in code
    that way. Returns MLflow's ``ModelInfo``."""
    import albef
    from albef.model_files import read_config

    pyfunc = get_task(task).pyfunc_class()
    model_dir = Path(model_dir)
    saved, _ = read_config(model_dir)
    if saved != pyfunc.task:
        raise ValueError(
            f"{model_dir} holds a {saved!r} model; the {pyfunc.task} pyfunc needs a {pyfunc.task} model"
        )
    for needed in ("tokenizer", *pyfunc.required):
        if not (model_dir / needed).exists():
            raise FileNotFoundError(f"{model_dir / needed} not found: export the model with its {needed}")
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={MODEL_ARTIFACT: str(model_dir)},
        code_paths=[str(Path(albef.__file__).parent)],
        signature=string_signature(pyfunc.columns),
        input_example=pyfunc.example(),
        model_config=settings or pyfunc.settings({}),
        pip_requirements=pip_requirements(),
    )
