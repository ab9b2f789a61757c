"""The settings as environment variables, for ``config`` and ``worker --help``, with secrets redacted."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel

#: Prefix of every setting's environment variable.
ENV_PREFIX: Final = "ANALYSIS_"
REDACTED: Final = "***"
#: Field names whose values are secrets as a whole.
_SECRET_NAME = re.compile(r"password|secret|token|api_?key", re.IGNORECASE)
#: ``password=...`` inside a libpq key/value DSN.
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with the password of its credentials replaced by ``***``.

    >>> redact_url("amqp://guest:pw@host:5672/vh")
    'amqp://guest:***@host:5672/vh'
    """
    try:
        parts = urlsplit(url)
        password = parts.password
        port = parts.port
    except ValueError:  # not a URL after all (a bad port...): leave nothing that could be a secret
        return _KV_PASSWORD.sub(rf"\1{REDACTED}", url)
    if password is None:
        return _KV_PASSWORD.sub(rf"\1{REDACTED}", url)
    netloc = f"{parts.username or ''}:{REDACTED}@{parts.hostname or ''}"
    if port is not None:
        netloc += f":{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def redact(name: str, value: Any) -> str:
    """A setting's value as text, redacted when ``name`` says it is a secret or it holds credentials."""
    if value is None:
        return ""
    if _SECRET_NAME.search(name):
        return REDACTED if value else ""
    text = json.dumps(list(value)) if isinstance(value, tuple | list) else str(value)  # as the env takes it
    return redact_url(text) if ("://" in text or "password" in text.lower()) else text


def _fields(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, str, Any]]:
    """``(env name, field name, field info)`` of every leaf field, nested models flattened with ``__``."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _fields(annotation, f"{prefix}{name.upper()}__")
        else:
            yield f"{prefix}{name.upper()}", name, info


def effective_settings(settings: BaseModel) -> dict[str, str]:
    """Every setting's effective value by environment variable name, secrets redacted."""
    values: dict[str, str] = {}

    def walk(model: BaseModel, prefix: str) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name.upper()}__")
            else:
                values[f"{prefix}{name.upper()}"] = redact(name, value)

    walk(settings, ENV_PREFIX)
    return values


def describe_settings(model: type[BaseModel]) -> list[str]:
    """One line per setting: its variable, default (redacted) and description."""
    lines = []
    for env, name, info in _fields(model, ENV_PREFIX):
        default = redact(name, info.get_default(call_default_factory=True))
        text = f"{env} (default: {default or 'none'})"
        if info.description:
            text += f": {info.description}"
        lines.append(text)
    return lines
