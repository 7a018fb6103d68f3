"""The model registry: an exported student logged as an MLflow model and registered under a name."""

from __future__ import annotations

from pathlib import Path

from tskd_tune.tracking.runs import client, experiment_id, numeric


def register_export(uri: str, export_dir: Path, card: dict, name: str) -> str:
    """Log an exported student as an MLflow model and register it as ``name``; returns the version."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    # created as a search creates it (artifacts beside a SQLite store), if it is not there yet
    mlflow.set_experiment(experiment_id=experiment_id(uri, card["config"]["tracking"]["experiment"]))
    with mlflow.start_run(run_name=f"register-{name}") as run:
        mlflow.log_dict(card, "model_card.json")
        mlflow.log_metrics(numeric(card.get("metrics", {})))
        import onnx

        model = onnx.load(str(Path(export_dir) / card["file"]))
        info = mlflow.onnx.log_model(model, name="student", registered_model_name=name)
    client(uri).set_tag(run.info.run_id, "tskd.registered_model", name)
    return str(info.registered_model_version)
