"""MLflow tracking, registry and promotion for albef's stages.

``config``      the typed ``mlflow`` and ``register`` sections of params.yaml
``journal``     the write-ahead journal of tracking calls and their (late) delivery
``run``         one nested MLflow run per stage under a pipeline parent run
``stages``      the training and evaluation stages with their runs
``registry``    versions, the promotion gate, champion/challenger aliases, rollback
``register``    the ``register`` pipeline stage
"""
