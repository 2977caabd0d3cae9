"""One Prefect flow per pipeline stage. Each runs its DVC stage(s) through ``dvc repro`` (see
``flows/tasks.py``); the stage logic lives in ``albef`` and ``dvc.yaml``, never here.

=============  ================================================================
flow           DVC stages
=============  ================================================================
``data``       ``synth``
``preprocess`` ``preprocess``
``pretrain``   ``unimodal``, ``pretrain``
``finetune``   ``finetune_*`` (retrieval, VQA, SNLI-VE, NLVR2, weakly supervised grounding; and
               ``pretrain_nlvr``, the prerequisite of ``finetune_nlvr``)
``evaluate``   ``evaluate_*`` (zero-shot, finetuned and shifted-test-set retrieval, VQA, SNLI-VE, NLVR2,
               Grad-CAM grounding)
``register``   ``register``, ``register_*`` (one per task's model), ``summary`` (one screen of results)
=============  ================================================================

Parameters, the same for every flow, are described in ``flows/options.py`` (the Prefect run form shows them).
A run with ``overrides`` works in a workspace of its own and ends as a DVC experiment; the checkout's
``params.yaml`` is never written (``albef.orchestration.workspace``).
"""

from __future__ import annotations

import functools

from prefect import flow

from flows.options import flow_function
from flows.tasks import run_flow_stages


def stage_flow(flow_name: str, summary: str):
    """The flow ``flow_name``: its DVC stages (the table above) through :func:`flows.tasks.run_flow_stages`,
    with the parameters every flow takes (:func:`flows.options.flow_parameters`)."""
    body = functools.partial(run_flow_stages, flow_name)
    return flow(name=flow_name, log_prints=True)(flow_function(flow_name, summary, body))


data = stage_flow("data", "The embedded synthetic benchmark (DVC stage synth).")
preprocess = stage_flow("preprocess", "Validation, shards and tokenizer (DVC stage preprocess).")
pretrain = stage_flow(
    "pretrain",
    "The unimodal warm start, then ALBEF pretraining: ITC + ITM + MLM with momentum distillation (DVC stages "
    "unimodal, pretrain).",
)
finetune = stage_flow(
    "finetune",
    "Finetuning of the pretrained model for retrieval, VQA, SNLI-VE, NLVR2 and weakly supervised grounding "
    "(DVC stages finetune_*, with pretrain_nlvr before finetune_nlvr).",
)
evaluate = stage_flow(
    "evaluate",
    "Zero-shot, finetuned and cross-dataset (shifted test set) retrieval, VQA, SNLI-VE, NLVR2 and Grad-CAM "
    "grounding evaluation (DVC stages evaluate_*).",
)
register = stage_flow(
    "register",
    "The evaluated models into the MLflow registry, each with the promotion gate (DVC stages register, "
    "register_vqa, register_ve, register_grounding, register_nlvr), then the one-screen summary.",
)

STAGE_FLOWS = {
    "data": data,
    "preprocess": preprocess,
    "pretrain": pretrain,
    "finetune": finetune,
    "evaluate": evaluate,
    "register": register,
}
