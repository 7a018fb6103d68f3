"""The model registry: an exported student logged as an MLflow model and registered under a name."""

from __future__ import annotations

from pathlib import Path

from tskd_tune.tracking.runs import client, experiment_id, numeric

HEADLINE = ("val_dice", "test_dice", "val_hd95", "test_hd95", "student_params", "student_latency_ms")
"""The metrics a registration run carries (the trial's own run has every other)."""


def register_export(uri: str, export_dir: Path, card: dict, name: str) -> str:
    """Log an exported student as an MLflow model and register it as ``name``; returns the version.

    The model is logged by a run nested under the search's run when the student comes from a search (so the
    registration sits with the search in the runs table), with the headline metrics, the model card, an
    input/output signature, and a model version whose description and tags point to the trial and search."""
    import mlflow
    import numpy as np
    import onnx
    from mlflow.models import infer_signature

    from tskd_tune.methods import get_method

    origin = card.get("trial", {})
    mlflow.set_tracking_uri(uri)
    # created as a search creates it (artifacts beside a SQLite store), if it is not there yet
    mlflow.set_experiment(experiment_id=experiment_id(uri, card["config"]["tracking"]["experiment"]))
    tags = {"tskd.registered_model": name, **{f"tskd.trial.{k}": str(v) for k, v in origin.items()}}
    if "search_run_id" in origin:
        tags["mlflow.parentRunId"] = origin["search_run_id"]
    inp = card["input"]
    example = np.zeros((1, inp["channels"], *inp["size"]), dtype=np.float32)
    logits = np.zeros((1, len(card["classes"]), *inp["size"]), dtype=np.float32)
    label = f" ({origin['name']} of {origin.get('search', 'a search')})" if "name" in origin else ""
    with mlflow.start_run(run_name=f"register {name}{label}", tags=tags):
        mlflow.log_dict(card, "model_card.json")
        mlflow.log_metrics({k: v for k, v in numeric(card.get("metrics", {})).items() if k in HEADLINE})
        model = onnx.load(str(Path(export_dir) / card["file"]))
        info = mlflow.onnx.log_model(
            model, name="student", registered_model_name=name, signature=infer_signature(example, logits)
        )
    version = str(info.registered_model_version)
    c = client(uri)
    metrics = card.get("metrics", {})
    scores = ", ".join(
        f"{k} {metrics[k]:.4f}" for k in ("val_dice", "test_dice") if isinstance(metrics.get(k), int | float)
    )
    where = (
        f"trial {origin['name']} of search {origin.get('search', '?')} (MLflow run {origin.get('mlflow_run_id', '?')})"
        if origin
        else "a standalone trial"
    )
    t = card["config"]["teacher"]
    uses = get_method(card["method"]).teacher is not None
    teacher = (
        f"{t['model']} ({'LoRA' if t['adapt'] == 'lora' else 'frozen encoder'}, {t['head']} head)"
        if uses
        else "none"
    )
    c.update_model_version(
        name,
        version,
        description=(
            f"{card['student']['model']} student, method {card['method']}, teacher {teacher}, "
            f"classes {', '.join(card['classes'])}; "
            f"{where}{'; ' + scores if scores else ''}. Input {inp['layout']} {inp['channels']}x{inp['size'][0]}x{inp['size'][1]} "
            f"in [0, 1]; output: class logits."
        ),
    )
    for key, value in {
        "method": card["method"],
        "student": card["student"]["model"],
        "teacher": teacher,
        **origin,
    }.items():
        c.set_model_version_tag(name, version, f"tskd.{key}", str(value))
    return version
