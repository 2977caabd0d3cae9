"""Shared fixtures. Tests never touch the network: offline switches are set before anything imports."""

from __future__ import annotations

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

from albef.config import ModelConfig, tiny_config  # noqa: E402

# Intra-op threads per test process: the cores shared among pytest-xdist's workers (`-n auto`: one worker per
# core, so one thread each). Set in the environment too, so that every process a test starts (stages, torchrun
# workers, flow runs) gets the same share: OpenMP threads spin while they wait, and two workers' processes each
# running two threads on two cores spend a good part of the machine spinning.
THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()


def make_batch(cfg: ModelConfig, batch: int = 4, length: int = 8, seed: int = 0):
    """Random normalised images and token ids ([CLS] first, padding at the end of some rows)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(5, cfg.text.vocab_size, (batch, length), generator=g)
    ids[:, 0] = cfg.text.cls_token_id
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        n = length - (row % 3)
        ids[row, n:] = cfg.text.pad_token_id
        mask[row, n:] = 0
    return images, ids, mask


# ----------------------------------------------------------------------------- a tiny training pipeline

TINY_MODEL = {
    # the tiny preset with the special-token ids and vocabulary of the tokenizer built from the synthetic texts
    "preset": "tiny",
    "text": {"vocab_size": 1000, "cls_token_id": 2, "sep_token_id": 3, "mask_token_id": 4},
    "queue_size": 16,
}


def under_deterministic_algorithms(compute):
    """``compute()`` with PyTorch's deterministic algorithms on: the reference for gradients that must be
    summed in a fixed order, whatever the thread timing."""
    torch.use_deterministic_algorithms(True)
    try:
        return compute()
    finally:
        torch.use_deterministic_algorithms(False)


def tiny_train_params(root, **overrides) -> dict:
    """params.yaml sections for pretrain -> finetune -> evaluate on the tiny data under ``root``."""
    import copy

    data = str(root / "data" / "processed")
    common = {
        "data_dir": data,
        "batch_size": 4,
        "epochs": 2,
        "lr": 1e-3,
        "warmup_stair": 2,
        "num_workers": 0,
        "log_every": 1,
        "hflip": False,
        "max_tokens": 16,
        "k_test": 4,
        "eval_batch_size": 8,
    }
    params = {
        "model": copy.deepcopy(TINY_MODEL),
        "pretrain": {
            **common,
            "train_file": "pretrain.json",
            "val_file": "retrieval_val.json",
            "out": str(root / "models" / "pretrain"),
            "run_dir": str(root / "runs" / "pretrain"),
            "metrics": str(root / "metrics" / "pretrain.json"),
            "plots": str(root / "plots" / "pretrain"),
        },
        "finetune_retrieval": {
            **common,
            "train_file": "retrieval_train.json",
            "val_file": "retrieval_val.json",
            "init": str(root / "models" / "pretrain"),
            "out": str(root / "models" / "retrieval"),
            "run_dir": str(root / "runs" / "finetune_retrieval"),
            "metrics": str(root / "metrics" / "finetune_retrieval.json"),
            "plots": str(root / "plots" / "finetune_retrieval"),
            "crop_scale": [0.5, 1.0],
            "select_metric": "r_mean",
        },
        "evaluate": {"data_dir": data, "k_test": 4, "max_tokens": 16, "num_workers": 0, "examples": 2},
    }
    for key, value in overrides.items():
        name, _, field_name = key.partition(".")
        params[name][field_name] = value
        if value is None and name == "model":
            del params[name][field_name]
    return params


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny synthetic benchmark, preprocessed into shards with its tokenizer: ``<root>/data/processed``."""
    from albef.data.stages import preprocess_stage, synth_stage

    root = tmp_path_factory.mktemp("tiny_data")
    params = {
        "synth": {
            "out": str(root / "data" / "synth"),
            "seed": 1,
            "image_size": 48,
            "pretrain_images": 24,
            "retrieval_train_images": 8,
            "retrieval_val_images": 4,
            "retrieval_test_images": 6,
            "vqa_train_images": 0,
            "vqa_test_images": 0,
            "ve_images": 0,
            "nlvr_pairs": 0,
            "grounding_images": 0,
            "shifted_test_images": 0,
            "workers": 1,
        },
        "preprocess": {
            "image_root": str(root / "data" / "synth"),
            "out_dir": str(root / "data" / "processed"),
            "files": {
                "pretrain.json": "pretrain",
                "retrieval_train.json": "retrieval_train",
                "retrieval_val.json": "retrieval_eval",
                "retrieval_test.json": "retrieval_eval",
            },
            "max_side": 48,
            "shard_size": 32,
            "workers": 1,
        },
        "tokenizer": {"vocab_size": 1000, "train_files": ["pretrain.json", "retrieval_train.json"]},
    }
    synth_stage(params, progress=False)
    preprocess_stage(params, progress=False)
    return root


# ----------------------------------------------------------------------------- several processes

_CALL_SCRIPT = """\
import importlib, json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
module, name = sys.argv[1].split(":")
getattr(importlib.import_module(module), name)(**json.loads(sys.argv[2]))
"""


def call_under_torchrun(function: str, kwargs: dict, workdir, nproc: int = 2, timeout: int = 300) -> str:
    """Call ``function`` ("package.module:name") with the JSON-able ``kwargs`` in ``nproc`` CPU processes
    started by torchrun (gloo on loopback), the way ``ALBEF_NPROC_PER_NODE`` runs a stage; returns their
    combined log, which names each rank's share."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(workdir) / "call_under_torchrun.py"
    script.write_text(_CALL_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += [str(script), function, json.dumps(kwargs, default=str)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default for several workers, made explicit
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return log


def assert_halves_logged(log: str, what: str, n: int) -> None:
    """Two ranks split ``n`` evaluation items as ``evaluation_share`` does, and each logged its half."""
    half = (n + 1) // 2
    assert f"rank 0 of 2 evaluates {what} 0-{half - 1} of {n}" in log, log[-2000:]
    assert f"rank 1 of 2 evaluates {what} {half}-{n - 1} of {n}" in log, log[-2000:]


def same_json_outputs(one, two, names) -> dict:
    """Assert that the files ``names`` hold equal JSON in folders ``one`` and ``two``, timing aside (a
    ``metrics.json`` must carry a non-negative ``eval_seconds``); returns ``one``'s contents by name."""
    import json
    from pathlib import Path

    contents = {}
    for name in names:
        a, b = (json.loads((Path(folder) / name).read_text()) for folder in (one, two))
        if name == "metrics.json":
            assert a.pop("eval_seconds") >= 0 and b.pop("eval_seconds") >= 0
        assert b == a, name
        contents[name] = a
    return contents


def with_one_thread(compute):
    """``compute()`` on one intra-op thread, as each torchrun worker runs (torchrun sets OMP_NUM_THREADS=1),
    so that results compare bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return compute()
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- MLflow on loopback


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory):
    """A sqlite file with MLflow's schema migrated once (seconds); tests copy it (milliseconds)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    SqlAlchemyStore(f"sqlite:///{path}", str(path.parent / "artifacts")).engine.dispose()
    return path


@pytest.fixture
def mlflow_sqlite(tmp_path, mlflow_template_db, monkeypatch) -> str:
    """A fresh sqlite tracking store for one test; the test runs in ``tmp_path`` (./mlruns, spool there)."""
    import shutil

    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("ALBEF_MLFLOW_PARENT_RUN_ID", "ALBEF_MLFLOW_PIPELINE"):
        monkeypatch.delenv(name, raising=False)
    return uri


class ServiceProcess:
    """A server started in its own process group on loopback, stopped with the whole group."""

    def __init__(
        self, cmd: list[str], url: str, log_path, env: dict[str, str] | None = None, ready: str = "/health"
    ):
        import subprocess

        self.url, self.log_path = url, log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self._wait(ready)

    def _wait(self, path: str, timeout: float = 90.0) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server at {self.url} not ready in {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        from pathlib import Path

        return Path(self.log_path).read_text()[-chars:]

    def stop(self) -> None:
        import signal
        import subprocess

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def mlflow_env(**extra: str) -> dict[str, str]:
    import sys
    from pathlib import Path

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)  # a server or a served model gets only what the test gives it
    env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **extra)
    return env


def start_mlflow_server(
    root, mlflow_template_db, artifacts: str, env: dict[str, str] | None = None
) -> ServiceProcess:
    """``mlflow server`` with a copy of the migrated sqlite store, one worker (start-up ~10 s instead of ~20 s)."""
    import shutil
    import sys
    from pathlib import Path

    root = Path(root)
    shutil.copy(mlflow_template_db, root / "mlflow.db")
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        artifacts,
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    return ServiceProcess(cmd, f"http://127.0.0.1:{port}", root / "server.log", env or mlflow_env())


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, mlflow_template_db):
    """A real tracking server (sqlite backend, proxied local artifacts) shared by the session; tests keep
    apart by their own experiment and model names."""
    root = tmp_path_factory.mktemp("mlflow_server")
    server = start_mlflow_server(root, mlflow_template_db, str(root / "artifacts"))
    yield server
    server.stop()


@pytest.fixture
def tracked(mlflow_server, monkeypatch, tmp_path):
    """Point MLflow at the session server for one test; returns a unique experiment name for it."""
    import uuid

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    for name in ("ALBEF_MLFLOW_PARENT_RUN_ID", "ALBEF_MLFLOW_PIPELINE"):
        monkeypatch.delenv(name, raising=False)
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def tiny_retrieval_model(tiny_data, tmp_path_factory):
    """An exported tiny retrieval model (random weights, the tiny data's tokenizer), as `export_model` writes."""
    from albef.checkpoint import build_model
    from albef.config import ModelConfig
    from albef.tokenizer import ALBEFTokenizer
    from albef.train.stages import export_model

    torch.manual_seed(0)
    model = build_model("retrieval", ModelConfig.from_dict(TINY_MODEL, prefix="model"))
    tokenizer = ALBEFTokenizer.from_pretrained(tiny_data / "data" / "processed" / "tokenizer")
    out = tmp_path_factory.mktemp("tiny_model") / "retrieval"
    return export_model(model, out, tokenizer, None, {"stage": "test"})


# The synthetic benchmark at the smallest sizes every stage of the whole pipeline still runs on.
TINY_SYNTH = {
    "pretrain_images": 16,
    "retrieval_train_images": 8,
    "retrieval_val_images": 4,
    "retrieval_test_images": 4,
    "vqa_train_images": 4,
    "vqa_test_images": 4,
    "ve_images": 8,
    "nlvr_pairs": 8,
    "grounding_images": 14,
    "shifted_test_images": 4,
    "image_size": 64,
}


def shrink_pipeline(params: dict, train: dict) -> dict:
    """The project's params.yaml shrunk so every dvc.yaml stage runs in seconds on tiny synthetic data:
    ``train`` (batch size, epochs, ...) goes into every training section; evaluation sections get tiny k."""
    params["model"] = TINY_MODEL
    params["unimodal"].update(vision_steps=20, text_steps=20, batch_size=8, warmup_steps=2)
    for name in ("pretrain", "finetune_retrieval", "finetune_grounding"):
        if name in params:
            params[name].update(train)
    no_k = {k: v for k, v in train.items() if k != "k_test"}
    for name in ("finetune_vqa", "finetune_ve", "pretrain_nlvr", "finetune_nlvr"):
        if name in params:
            params[name].update(no_k)
    if "pretrain_nlvr" in params:
        params["pretrain_nlvr"].update(max_steps=0)
    params["evaluate"].update(k_test=4, num_workers=0, examples=2)
    if "evaluate_vqa" in params:
        params["evaluate_vqa"].update(k_test=4)
    if "evaluate_grounding" in params:
        params["evaluate_grounding"].update(batch_size=8, num_workers=0, examples=1)
    return params


def load_in_fresh_python(script: str, request_file, tracking_uri: str, cwd, timeout: int = 300):
    """Run ``script`` (given ``request_file`` as argv[1]) in a new interpreter without PYTHONPATH, so a
    registered model must bring albef's code itself (code_paths); its last stdout line parsed as JSON."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script, str(request_file)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# The Prefect harness's session fixtures (a server, the deployments, a worker, a project clone, one finished
# full_pipeline run), shared by every module that uses them. Imported last: the harness reads TINY_SYNTH and
# shrink_pipeline from this module.
from prefect_harness import (  # noqa: E402, F401
    deployments,
    full_pipeline_run,
    prefect,
    project,
    settings,
    worker,
)

# Parallel runs: the README's test command runs `pytest -n auto` (pytest-xdist). A worker takes a whole module at
# a time, so module fixtures are built once, and the modules that use the Prefect harness go to one worker
# together, in the order listed (one Prefect server and one full_pipeline run for all of them; test_dvc_pipeline
# last, as its DVC experiment changes the checkout). The longest go first: the Prefect modules, then the data and
# remote tests of DVC, then the rest in collection order. (xdist's own `--dist loadgroup` is not used: with
# pytest 9 it groups nothing, the group suffix it writes to `item._nodeid` is no longer read.)
PREFECT_HARNESS_MODULES = ("test_prefect_flows.py", "test_ui_browser.py", "test_dvc_pipeline.py")
LONGEST_FIRST = ("prefect-harness", "test_dvc.py")


def xdist_scope(nodeid: str) -> str:
    """The unit of work one xdist worker takes whole: the test's module, or the Prefect harness's modules."""
    module = nodeid.split("::", 1)[0]
    return "prefect-harness" if module.rsplit("/", 1)[-1] in PREFECT_HARNESS_MODULES else module


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    strays = sorted(
        {i.path.name for i in items if "prefect" in i.fixturenames} - set(PREFECT_HARNESS_MODULES)
    )
    if strays:
        raise pytest.UsageError(
            f"{', '.join(strays)} use the Prefect harness: add them to PREFECT_HARNESS_MODULES in tests/conftest.py "
            "(else each xdist worker starts a Prefect server and a full_pipeline run of its own)"
        )

    def rank(item) -> tuple[int, int]:
        module = item.path.name
        if module in PREFECT_HARNESS_MODULES:
            return 0, PREFECT_HARNESS_MODULES.index(module)
        return (LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)), 0

    items.sort(key=rank)
