"""Secrets: which environment variables hold them, and how they are kept out of text.

Secrets never come from a config file, only from the environment variables below. Whatever is printed,
logged, or written to MLflow (an error message, a parameter, a tag, a Ray Job's log) goes through
:func:`mask_secrets` or :func:`secret_values` first, and a URI that carries a password is refused
(:func:`refuse_embedded_password`): it would end up in YAML, ``search.json`` and run tags.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

from tskd_tune.errors import TskdError

SECRET_ENV = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "PGPASSWORD",
    "RAY_AUTH_TOKEN",
)
"""The environment variables whose values are secrets: masked wherever text leaves the process."""
MLFLOW_CREDENTIAL_ENV = (
    "MLFLOW_TRACKING_USERNAME",
    *(name for name in SECRET_ENV if name.startswith("MLFLOW_TRACKING_")),
)
"""How MLflow's client logs in to a tracking server: the user name with the secrets above. Trials need
them too; a Ray Job's log lines that hold any of their values are not shown."""
MLFLOW_CLIENT_ENV = MLFLOW_CREDENTIAL_ENV + (
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)
"""What MLflow's client reads from the environment to reach a remote server."""

WHERE_PASSWORDS_GO = (
    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD for an MLflow server, PGPASSWORD for PostgreSQL"
)
"""Where a user puts the password a URI must not carry (said in the errors that refuse one)."""

_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/:@\s]*):[^/@\s]*@")


def mask_secrets(text: str) -> str:
    """``text`` with URI passwords (``scheme://user:***@host``) and secret environment values as ``***``."""
    text = _URI_PASSWORD.sub(r"\g<head>:***@", text)
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 4:  # a one-letter "secret" would mask half the text
            text = text.replace(value, "***")
    return text


def mask_uri(uri: str | None) -> str:
    """``uri`` with any password replaced by ``***`` (``http://user:***@host``), for printing."""
    return mask_secrets(uri) if uri else ""


def secret_values() -> list[str]:
    """The MLflow credential values present in this environment (what must never be printed or logged)."""
    return [os.environ[k] for k in MLFLOW_CREDENTIAL_ENV if os.environ.get(k)]


def mlflow_env() -> dict[str, str]:
    """The MLflow client settings of this process's environment that trials need as well."""
    return {k: os.environ[k] for k in MLFLOW_CLIENT_ENV if os.environ.get(k)}


def has_password(uri: str | None) -> bool:
    """Whether ``uri`` (``scheme://user:password@host``) carries a password; False for a malformed URI."""
    if not uri or "://" not in uri:
        return False
    try:
        return urlsplit(uri).password is not None
    except ValueError:
        return False


def refuse_embedded_password(uri: str | None, field: str, env_hint: str) -> None:
    """Credentials never travel in a URI (it ends up in YAML, search.json and run tags)."""
    if has_password(uri):
        raise TskdError(f"{field}: {mask_uri(uri)} holds a password; remove it from the URI and {env_hint}")
