"""cluster/: Ray autoscaler configs against Ray's own schema, KubeRay and MLflow manifests against our CLI and pins."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PINS = dict(
    re.match(r"([A-Za-z0-9_.\-\[\],]+)==(\S+)", d).groups() for d in PYPROJECT["project"]["dependencies"]
)
RAY_VERSION = PINS["ray[default,tune]"]
IMAGE = f"REGISTRY/tskd-tune:{PYPROJECT['project']['version']}"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("name", ["ray-cluster.aws.yaml", "ray-cluster.gcp.yaml"])
def test_autoscaler_config_passes_rays_own_schema_and_checks(name):
    import json

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / name).read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # what `ray up` does before it launches anything: fill in the provider's defaults, then check again
    validate_config(prepare_config(config))

    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head never runs a trial
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 and t["max_workers"] >= 1 for t in workers)
    assert config["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    assert any("pip install" in c and "/home/ray/tskd-tune" in c for c in config["setup_commands"])
    assert config["file_mounts"]["/home/ray/tskd-tune"] == "."
    # shared storage: mounted on the host and handed to the container at the same path
    assert any("mount" in c and "/mnt/shared" in c for c in config["initialization_commands"])
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    # token auth on every node, with the token file copied to all of them
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start)
    head_start = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard` (SSH), never public


def test_raycluster_has_head_gpu_workers_shared_volume_and_token_from_a_secret():
    pvc, cluster = docs(CLUSTER / "kuberay" / "raycluster.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert cluster["kind"] == "RayCluster" and cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == RAY_VERSION
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["serviceType"] == "ClusterIP"
    assert {p["containerPort"] for p in containers(head["template"])[0]["ports"]} >= {6379, 8265, 10001}
    groups = spec["workerGroupSpecs"]
    assert all(containers(g["template"])[0]["resources"]["limits"]["nvidia.com/gpu"] == "1" for g in groups)
    assert all(g["maxReplicas"] >= 1 for g in groups)
    for template in [head["template"], *(g["template"] for g in groups)]:
        (c,) = containers(template)
        assert c["image"] == IMAGE
        env = env_of(c)
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": "ray-auth-token", "key": "auth_token"}}
        # MLflow credentials come from a Secret, as environment variables, never from the YAML of a search
        assert env["MLFLOW_TRACKING_USERNAME"]["secretKeyRef"]["name"] == "mlflow-credentials"
        assert env["MLFLOW_TRACKING_PASSWORD"]["secretKeyRef"]["name"] == "mlflow-credentials"
        assert {"name": "shared", "mountPath": "/mnt/shared"} in c["volumeMounts"]
        assert template["spec"]["volumes"] == [
            {"name": "shared", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}}
        ]


def test_rayjob_entrypoint_parses_with_the_real_cli_and_targets_the_cluster():
    import typer

    from tskd_tune.cli import app

    (job,) = docs(CLUSTER / "kuberay" / "rayjob.yaml")
    (cluster,) = docs(CLUSTER / "kuberay" / "raycluster.yaml")[1:]
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["tskd-tune", "launch"]
    command = typer.main.get_command(app)
    launch = command.get_command(None, "launch")
    params = launch.make_context("launch", argv[2:]).params  # raises on an unknown or malformed option
    assert params["address"] == "auto" and str(params["storage"]).startswith("/mnt/shared/")
    assert params["tracking_uri"].startswith("http://mlflow.mlflow.svc")
    # the space file ships in the image (cluster/Dockerfile copies search_spaces/ to /opt/tskd-tune)
    space = Path(str(params["space"]))
    assert space.is_relative_to("/opt/tskd-tune") and (REPO / space.relative_to("/opt/tskd-tune")).is_file()
    from tskd_tune.config import load_config, parse_overrides

    load_config(REPO / space.relative_to("/opt/tskd-tune"), parse_overrides(params["set_"]))
    (submitter,) = containers(job["spec"]["submitterPodTemplate"])
    assert submitter["image"] == IMAGE and env_of(submitter)["RAY_AUTH_MODE"] == "token"


def test_images_agree_with_the_package_pins():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_VERSION}-py311-gpu" in dockerfile
    assert "COPY --chown=ray:users search_spaces /opt/tskd-tune/search_spaces" in dockerfile
    extra = PYPROJECT["project"]["optional-dependencies"]["cluster"]
    mlflow_image = (CLUSTER / "mlflow" / "Dockerfile").read_text()
    assert f"mlflow=={PINS['mlflow']}" in mlflow_image
    for pin in extra:  # the server image installs the same driver and auth dependency as the extra
        assert pin in mlflow_image


def test_mlflow_manifests_postgres_backend_proxied_artifacts_and_basic_auth():
    manifests = docs(CLUSTER / "mlflow" / "mlflow.yaml")
    by_kind = {}
    for d in manifests:
        by_kind.setdefault(d["kind"], []).append(d)
    assert set(by_kind) == {"ConfigMap", "Service", "StatefulSet", "PersistentVolumeClaim", "Deployment"}
    assert all(d["metadata"]["namespace"] == "mlflow" for d in manifests)
    (deploy,) = by_kind["Deployment"]
    (server,) = containers(deploy["spec"]["template"])
    args = dict(a.split("=", 1) if "=" in a else (a, True) for a in server["args"])
    assert server["command"] == ["mlflow", "server"]
    assert args["--backend-store-uri"].startswith("postgresql+psycopg2://mlflow@postgres.mlflow.svc")
    assert args["--serve-artifacts"] is True and args["--artifacts-destination"] == "/mlartifacts"
    assert args["--app-name"] == "basic-auth"
    assert ":" not in args["--backend-store-uri"].split("://", 1)[1].split("@")[0]  # no password in the URI
    env = env_of(server)
    for var in ("PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[var]["secretKeyRef"]["name"] == "mlflow-secrets"
    (config,) = by_kind["ConfigMap"]
    ini = config["data"]["basic_auth.ini"]
    assert "database_uri = postgresql+psycopg2://mlflow@postgres" in ini and "admin_password" not in ini
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert {"name": "artifacts", "mountPath": "/mlartifacts"} in server["volumeMounts"]
    (pg,) = by_kind["StatefulSet"]
    (postgres,) = containers(pg["spec"]["template"])
    assert postgres["image"].startswith("postgres:") and env_of(postgres)["POSTGRES_DB"] == "mlflow"
    assert "CREATE DATABASE mlflow_auth" in config["data"]["init.sql"]
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    assert services["mlflow"]["spec"]["ports"][0]["port"] == 5000
    assert services["postgres"]["spec"]["selector"] == pg["spec"]["template"]["metadata"]["labels"]
    # the address the RayJob's trials log to is this service
    (job,) = docs(CLUSTER / "kuberay" / "rayjob.yaml")
    assert "http://mlflow.mlflow.svc.cluster.local:5000" in job["spec"]["entrypoint"]
