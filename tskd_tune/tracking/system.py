"""System metrics of a trial's run (CPU, memory, GPU), sampled by MLflow's own monitor."""

from __future__ import annotations

import logging


def system_monitor(tracking_cfg, uri: str, run_id: str, resumed: bool):
    """MLflow's own system-metrics sampler on ``run_id`` (``system/cpu_utilization_percentage``,
    ``system/gpu_0_utilization_percentage`` with pynvml, ...), or None when switched off."""
    if not tracking_cfg.system_metrics:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # its per-start "Started monitoring" info lines would fill every trial's log
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=tracking_cfg.system_metrics_interval_s,
        resume_logging=resumed,
        tracking_uri=uri,
    )
    monitor.start()
    return monitor


def stop_monitor(monitor) -> None:
    """Stop sampling and flush what was sampled (before the run is marked finished)."""
    if monitor is not None:
        monitor.finish()
