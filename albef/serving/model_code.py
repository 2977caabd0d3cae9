"""The code every registered albef model is logged with (MLflow's "models from code").

``mlflow.pyfunc.load_model`` runs this file instead of unpickling a ``python_model.pkl``: it imports albef's
pyfunc (from the model's ``code/`` copy of albef, or the installed one) and the model reads its weights,
config and tokenizer from its ``albef_model`` artifact as safetensors, JSON and tokenizer files. Nothing of a
registered albef model is pickled. The files that hold code (this one and ``code/``) are covered by the
registered version's checksum (:mod:`albef.tracking.integrity`), like every other file of the model.
"""

from mlflow.models import set_model

from albef.serving.tasks import ServedModel

set_model(ServedModel())
