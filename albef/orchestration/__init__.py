"""What the Prefect flows in ``flows/`` need, as plain Python that knows nothing of Prefect.

How Prefect and DVC share the work (one source of truth):

* **DVC owns the pipeline.** ``dvc.yaml`` says what each stage runs, reads and writes; ``params.yaml`` holds
  every setting; ``dvc.lock`` records what produced each output. A Prefect task runs exactly one DVC stage
  with ``dvc repro <stage>``, so caching (an unchanged stage is skipped), ``dvc.lock`` and the versioned
  outputs stay right whether a run starts from Prefect, from a shell or from ``dvc exp run``.
* **Prefect owns the when, where and what-if**: parameters, schedules, work pools, retries, deadlines,
  cancellation, logs and artifacts. A flow holds no stage logic: its overrides are written into
  ``params.yaml`` (validated by the stages' own config loaders, as ``dvc exp run -S`` writes them), and
  everything else happens inside the stage commands.

Modules:

``pipeline``    which DVC stages a flow runs, ``params.yaml`` overrides, GPU checks (all before any work)
``process``     a stage command in its own process group with a wall-clock deadline
``supervise``   the small supervisor process that owns that group (``python -m albef.orchestration.supervise``)
``launch``      ``albef pretrain`` & co. re-executed under ``torchrun`` when the flow asked for several GPUs
``mlflow_link`` the pipeline's MLflow parent run and the link to each stage's run (optional)
``report``      the Markdown of the artifacts each stage publishes
"""
