"""Security defaults (SECURITY.md): safe loading only, local-only binds, secrets masked and never logged.

The static guard parses the package's own source: a new ``torch.load`` without ``weights_only=True``,
a pickle, an ``eval`` or an unsafe YAML loader fails here before it reaches a user. Loading untrusted
files through the real CLI (a pickle payload as a checkpoint, a ``!!python`` YAML tag, a CSV or model
card naming ``../../etc/passwd``) is covered by the bad-input corpus (tests/bad_inputs).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "tskd_tune").rglob("*.py")) + sorted((REPO / "benchmarks").rglob("*.py"))
SECRET = "s3cr3t-Pa55word"

# modules that turn bytes into objects by running code
UNSAFE_MODULES = {"pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
# the one place that loads TorchScript (code, not data): `predict` on an export (see SECURITY.md)
TORCHSCRIPT_LOADERS = {"tskd_tune/export.py"}
# the one place that reads pickles: Ray Tune's own state files in a search folder, which Tuner.restore unpickles
# moments later anyway (see SECURITY.md); nothing a user hands in
RAY_STATE_READERS = {"tskd_tune/search/restore.py"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(path: Path, root: Path = REPO) -> list[str]:
    """Every unsafe deserialisation, code evaluation or weight format in one source file."""
    rel = str(path.relative_to(root))
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [
                f"{where}: imports {n}"
                for n in names
                if n.split(".")[0] in UNSAFE_MODULES and not (n == "pickle" and rel in RAY_STATE_READERS)
            ]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in {"eval", "exec"}:
            found.append(f"{where}: {name}()")
        elif name == "torch.load" and not _is_true(_kw(node, "weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        elif name == "torch.save":
            found.append(f"{where}: torch.save (weights go to safetensors)")
        elif name == "torch.jit.load" and rel not in TORCHSCRIPT_LOADERS:
            found.append(f"{where}: torch.jit.load (TorchScript runs code)")
        elif name in {"yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"}:
            found.append(f"{where}: {name}")
        elif name == "yaml.load":
            loader = _dotted(_kw(node, "Loader")) if _kw(node, "Loader") is not None else ""
            if loader not in {"_StrictLoader", "yaml.SafeLoader", "yaml.CSafeLoader"}:
                found.append(f"{where}: yaml.load with Loader={loader or 'None'}")
        elif name.endswith(("np.load", "numpy.load")) and _is_true(_kw(node, "allow_pickle")):
            found.append(f"{where}: np.load(allow_pickle=True)")
        elif name.startswith("subprocess.") and _is_true(_kw(node, "shell")):
            found.append(f"{where}: {name}(shell=True)")
        elif (
            name == "ray.init"
            and _kw(node, "dashboard_host") is not None
            and not (
                isinstance(_kw(node, "dashboard_host"), ast.Constant)
                and _kw(node, "dashboard_host").value == "127.0.0.1"
            )
        ):
            found.append(f"{where}: ray.init with a dashboard reachable beyond this machine")
        elif _is_true(_kw(node, "trust_remote_code")):
            found.append(f"{where}: trust_remote_code=True")
    return found


def test_package_source_has_no_unsafe_loading_or_eval():
    assert len(SOURCES) > 20
    assert [f for p in SOURCES for f in unsafe_calls(p)] == []


def test_static_guard_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch, yaml, numpy as np\n"
        "torch.load('w.pth')\ntorch.load('w.pth', weights_only=False)\ntorch.save({}, 'w.pt')\n"
        "yaml.load(open('a.yaml'), Loader=yaml.Loader)\nyaml.full_load('a: 1')\neval('1 + 1')\n"
        "np.load('a.npy', allow_pickle=True)\nmodel.eval()\ntorch.load('w.pth', weights_only=True)\n"
        "ray.init(dashboard_host='0.0.0.0')\nray.init(address='local', dashboard_host='127.0.0.1')\n"
    )
    found = sorted(unsafe_calls(bad, tmp_path), key=lambda f: int(f.split(":")[1]))
    assert [f.split(": ", 1)[1] for f in found] == [
        "imports pickle",
        "torch.load without weights_only=True",
        "torch.load without weights_only=True",
        "torch.save (weights go to safetensors)",
        "yaml.load with Loader=yaml.Loader",
        "yaml.full_load",
        "eval()",
        "np.load(allow_pickle=True)",
        "ray.init with a dashboard reachable beyond this machine",
    ]


def test_yaml_loader_is_safe():
    from tskd_tune.config.yaml_io import _StrictLoader

    assert issubclass(_StrictLoader, yaml.SafeLoader)
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.load("a: !!python/object/apply:os.getcwd []", Loader=_StrictLoader)


def test_a_checkpoint_that_runs_code_is_refused_and_does_not_run(tmp_path):
    import pickle

    from tskd_tune.errors import TskdError
    from tskd_tune.models.teacher import load_weights

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    (tmp_path / "raw.pth").write_bytes(pickle.dumps({"w": Payload()}, protocol=2))  # a bare pickle
    with pytest.raises(TskdError, match="UnpicklingError"):
        load_weights(tmp_path / "raw.pth")
    import torch

    torch.save({"w": Payload()}, tmp_path / "zip.pt")  # the zip format torch.save writes
    with pytest.raises(TskdError, match="UnpicklingError"):
        load_weights(tmp_path / "zip.pt")
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------------------------- secrets
def test_mask_secrets_hides_uri_passwords_and_secret_environment_values(monkeypatch):
    from tskd_tune.tracking import mask_secrets

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    text = f"cannot reach http://alice:{SECRET}@mlflow:5000/api; token {SECRET}; postgresql://u:pw@db/x"
    masked = mask_secrets(text)
    assert SECRET not in masked and "pw@" not in masked
    assert masked == "cannot reach http://alice:***@mlflow:5000/api; token ***; postgresql://u:***@db/x"
    assert mask_secrets("sqlite:///runs/mlflow.db and http://mlflow:5000") == (
        "sqlite:///runs/mlflow.db and http://mlflow:5000"
    )


def test_a_password_in_the_tracking_uri_flag_is_masked_in_the_error(tmp_path, monkeypatch, capfd):
    """launch against an unreachable server with credentials in --tracking-uri and in the environment."""
    from tests.conftest import tiny_raw
    from tskd_tune.cli import main

    raw = tiny_raw(tmp_path)
    raw["search"]["space"] = {"distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0}}
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET + "-env")
    monkeypatch.chdir(tmp_path)
    uri = f"http://alice:{SECRET}@127.0.0.1:9/"
    code = main(["launch", str(space), "--tracking-uri", uri, "--storage", str(tmp_path / "runs")])
    out, err = capfd.readouterr()
    assert code == 2 and "Traceback" not in err
    # refused before any connection: credentials come only from the environment (cluster.check_tracking_uri)
    assert err.startswith("error: tracking.uri: http://alice:***@127.0.0.1:9/ holds a password"), err
    assert SECRET not in out + err
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]  # no search folder, no store


def test_secrets_never_reach_mlflow_params_or_tags(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tskd_tune import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = MlflowClient(uri).create_run(tracking.experiment_id(uri, "sec"))
    tracker = tracking.RunTracker(uri, run.info.run_id)
    tracker.log_params(
        {"store": f"http://bob:{SECRET}@host/", "note": f"uses {SECRET}", "distill.temperature": 2.0}
    )
    tracker.set_tags({"tskd.error": f"ConnectionError: http://bob:{SECRET}@host/api/2.0 refused"})
    data = MlflowClient(uri).get_run(run.info.run_id).data
    logged = " ".join([*data.params.values(), *data.tags.values()])
    assert SECRET not in logged
    assert data.params["store"] == "http://bob:***@host/" and data.params["distill.temperature"] == "2.0"
    assert data.tags["tskd.error"] == "ConnectionError: http://bob:***@host/api/2.0 refused"


# ------------------------------------------------------------------------------------------- binds
def test_ui_command_binds_to_loopback():
    from tskd_tune.cli import ui_command

    cmd = ui_command("sqlite:///runs/mlflow.db", 5001)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5001"
    assert cmd.count("--host") == 1 and "0.0.0.0" not in cmd


@pytest.mark.slow  # the MLflow server takes 10-60 s to come up on these machines
def test_mlflow_ui_listens_on_loopback_only(tmp_path):
    """`tskd-tune ui` really starts the MLflow UI, and its socket is bound to 127.0.0.1, not 0.0.0.0."""
    import psutil

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tskd_tune", "ui", "--uri", f"sqlite:///{tmp_path}/m.db", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        listening = []
        deadline = time.monotonic() + 120
        while not listening and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            listening = [
                c.laddr.ip
                for c in psutil.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port
            ]
        assert listening, proc.stdout.read().decode() if proc.poll() is not None else "no listener"
        assert set(listening) == {"127.0.0.1"}
    finally:
        os.killpg(proc.pid, 15)  # the UI's own server processes are in this session
        proc.wait(timeout=30)
