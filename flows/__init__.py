"""albef's Prefect flows: one per pipeline stage (``flows/stages.py``) and ``full_pipeline``
(``flows/pipeline.py``). Deployments: ``prefect.yaml`` (``prefect deploy --all``) or ``python -m flows.serve``."""
