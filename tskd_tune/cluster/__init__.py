"""Beyond one machine: cluster addresses, shared storage, MLflow credentials and Ray Jobs.

``--address`` says where a search runs:

- ``auto`` or ``HOST:PORT``: this machine is a node of a Ray cluster; the driver runs here.
- ``ray://HOST:10001``: Ray Client; the driver runs here and its Ray calls run on the cluster.
- ``http(s)://HOST:8265``: the Jobs API; the whole ``tskd-tune launch`` is submitted as a Ray Job
  (the package and the YAML travel in its runtime_env) and runs on the cluster with ``--address auto``.

On a cluster of more than one node, every path a trial writes or reads (the search folder, the trial
cache with its teachers and synthetic pool, checkpoints named in the config) must be one file system
that every node sees. That is checked, not assumed: the driver writes a marker file and a Ray task on
each node reads it back. MLflow credentials come from the environment only and are handed to the
trials through Ray's object store, so they appear in no YAML, parameter, tag, runtime_env or log line.

- ``storage``: folders, ``file://`` and bucket URIs; copying a search to and from a URI
- ``checks``: the checks before a search runs on a cluster (shared folders, no password in a URI)
- ``jobs``: the Ray Jobs API (submit, follow, status) and Ray's token
- credentials and their masking are in :mod:`tskd_tune.secrets`
"""

from tskd_tune.cluster.checks import alive_nodes, check_tracking_uri, check_visible, prepare
from tskd_tune.cluster.jobs import (
    TOKEN_HELP,
    JobLaunch,
    is_job_address,
    job_client,
    job_status,
    ray_token,
    submit,
)
from tskd_tune.cluster.storage import (
    BUCKET_SCHEMES,
    check_storage,
    is_bucket,
    is_uri,
    local_copy,
    pull,
    push,
    storage_dir,
)
from tskd_tune.secrets import (
    MLFLOW_CLIENT_ENV as MLFLOW_ENV_VARS,
)
from tskd_tune.secrets import (
    MLFLOW_CREDENTIAL_ENV as MLFLOW_SECRET_VARS,
)
from tskd_tune.secrets import (
    mask_uri,
    mlflow_env,
    refuse_embedded_password,
    secret_values,
)

__all__ = [
    "BUCKET_SCHEMES",
    "MLFLOW_ENV_VARS",
    "MLFLOW_SECRET_VARS",
    "TOKEN_HELP",
    "JobLaunch",
    "alive_nodes",
    "check_storage",
    "check_tracking_uri",
    "check_visible",
    "is_bucket",
    "is_job_address",
    "is_uri",
    "job_client",
    "job_status",
    "local_copy",
    "mask_uri",
    "mlflow_env",
    "prepare",
    "pull",
    "push",
    "ray_token",
    "refuse_embedded_password",
    "secret_values",
    "storage_dir",
    "submit",
]
