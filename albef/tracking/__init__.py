"""MLflow tracking, registry and promotion for albef's stages.

``config``      the typed ``mlflow`` and ``register`` sections of params.yaml
``journal``     the write-ahead journal of tracking calls and their (late) delivery
``run``         one nested MLflow run per stage under a pipeline parent run
``store``       the experiment and its artifact locations
``provenance``  where a run came from: git commit, data version, library versions
``redact``      secrets kept out of params, tags, artifacts and messages
``registry``    versions, the promotion gate, champion/challenger aliases, rollback
``register``    the ``register`` pipeline stage
``integrity``   a registered model's files, sealed at registration and checked before loading
"""
