"""Base class for service settings read from the environment and an optional ``.env`` file.

Where values come from, highest priority first:

1. arguments given to the constructor (tests);
2. environment variables (``<PREFIX><FIELD>``, nested fields ``<PREFIX><SECTION>__<FIELD>``);
3. the ``.env`` file: ``.env`` in the current directory, or the file named by the environment
   variable ``<PREFIX>ENV_FILE`` (e.g. ``ANALYSIS_ENV_FILE=/etc/analysis/analysis.env``; empty:
   read no file). A missing file is not an error. ``${VAR}`` references inside it are expanded
   from the file's earlier lines and the environment, as docker compose does;
4. the defaults of the fields.

Names are case-insensitive. Variables with the prefix that name no field are ignored by pydantic;
:meth:`ServiceSettings.unknown_env_names` lists them (with the closest known name) so that the
entry points can warn about a misspelt setting instead of silently running with its default.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import structlog
from dotenv import dotenv_values
from pydantic import BaseModel
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

#: The ``.env`` file read when ``<PREFIX>ENV_FILE`` is not set (relative to the working directory).
DEFAULT_ENV_FILE = ".env"
#: Suffix (after the prefix) of the variable naming another ``.env`` file.
ENV_FILE_VARIABLE = "ENV_FILE"


class UnknownSetting(NamedTuple):
    """A prefixed variable that names no settings field."""

    name: str
    """The variable, upper-cased (e.g. ``ANALYSIS_WORKER__CONCURENCY``)."""
    source: str
    """Where it was found: ``"environment"`` or the ``.env`` file's path."""
    suggestion: str | None
    """The closest known variable name, when one is close enough."""


class ServiceSettings(BaseSettings):
    """Settings every service has: its name and how it logs.

    Subclasses add one nested model per backend and set ``env_prefix``; nested fields are read
    from variables such as ``ANALYSIS_POSTGRES__DSN`` (prefix, field, ``__``, sub-field).
    """

    model_config = SettingsConfigDict(
        env_nested_delimiter="__",
        env_file=DEFAULT_ENV_FILE,
        env_file_encoding="utf-8",
        extra="ignore",
    )

    service_name: str = "service"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Constructor, environment, ``.env`` file (``<PREFIX>ENV_FILE`` overrides its path), secrets."""
        if (
            isinstance(dotenv_settings, DotEnvSettingsSource)
            and dotenv_settings.env_file == cls.model_config.get("env_file")  # not given by the caller
            and cls.env_file_variable() in _upper_environ()
        ):
            dotenv_settings = DotEnvSettingsSource(settings_cls, env_file=cls.env_file_path())
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    @classmethod
    def env_prefix(cls) -> str:
        """The prefix of this class's variables, upper-cased (e.g. ``ANALYSIS_``)."""
        return str(cls.model_config.get("env_prefix") or "").upper()

    @classmethod
    def env_file_variable(cls) -> str:
        """The variable that names the ``.env`` file to read (e.g. ``ANALYSIS_ENV_FILE``)."""
        return f"{cls.env_prefix()}{ENV_FILE_VARIABLE}"

    @classmethod
    def env_file_path(cls, environ: Mapping[str, str] | None = None) -> Path | None:
        """The ``.env`` file the settings read: ``<PREFIX>ENV_FILE`` if set (empty: none), else ``.env``."""
        upper = _upper_environ(environ)
        if cls.env_file_variable() in upper:
            value = upper[cls.env_file_variable()].strip()
            return Path(value) if value else None
        default = cls.model_config.get("env_file")
        return Path(str(default)) if isinstance(default, str | os.PathLike) else None

    @classmethod
    def env_names(cls) -> frozenset[str]:
        """Every variable name the settings read, upper-cased, nested fields joined with ``__``."""
        delimiter = str(cls.model_config.get("env_nested_delimiter") or "__")
        return frozenset(_field_names(cls, cls.env_prefix(), delimiter))

    @classmethod
    def unknown_env_names(
        cls, environ: Mapping[str, str] | None = None, env_file: Path | Literal["default"] | None = "default"
    ) -> list[UnknownSetting]:
        """Prefixed variables (environment and ``.env`` file) that name no field, sorted by name.

        Parameters
        ----------
        environ : mapping, optional
            The environment to inspect; default ``os.environ``.
        env_file : path or None, optional
            The ``.env`` file to inspect as well; by default the one the settings read
            (:meth:`env_file_path`), ``None`` for none. A missing file contributes nothing.

        Returns
        -------
        list of UnknownSetting
            One entry per unknown name and source, with the closest known name when there is one
            (e.g. ``ANALYSIS_WORKER__CONCURENCY`` → ``ANALYSIS_WORKER__CONCURRENCY``).
        """
        environ = os.environ if environ is None else environ
        path = cls.env_file_path(environ) if env_file == "default" else env_file
        known = cls.env_names() | {cls.env_file_variable()}
        prefix = cls.env_prefix()
        sources: list[tuple[str, Iterator[str]]] = [("environment", iter(environ))]
        if path is not None and path.is_file():
            sources.append((str(path), iter(dotenv_values(path, interpolate=False))))
        unknown: list[UnknownSetting] = []
        for source, names in sources:
            for raw in names:
                name = raw.upper()
                if prefix and name.startswith(prefix) and name not in known:
                    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
                    unknown.append(UnknownSetting(name, source, close[0] if close else None))
        return sorted(unknown)


def warn_unknown_settings(
    settings_cls: type[ServiceSettings], environ: Mapping[str, str] | None = None
) -> list[UnknownSetting]:
    """Log a warning for every variable :meth:`ServiceSettings.unknown_env_names` finds; return them.

    Call it at start-up, after logging is configured, e.g.
    ``configure_logging(...); warn_unknown_settings(Settings)``.
    """
    log = structlog.get_logger("service_shared.settings")
    unknown = settings_cls.unknown_env_names(environ)
    for entry in unknown:
        log.warning(
            "unknown setting ignored",
            variable=entry.name,
            source=entry.source,
            did_you_mean=entry.suggestion,
        )
    return unknown


def _upper_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    return {k.upper(): v for k, v in (os.environ if environ is None else environ).items()}


def _field_names(model: type[BaseModel], prefix: str, delimiter: str) -> Iterator[str]:
    """``prefix + FIELD`` for every field of ``model``, recursing into nested models."""
    for name, field in model.model_fields.items():
        annotation: Any = field.annotation
        yield f"{prefix}{name.upper()}"  # a whole section may be given as JSON, too
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _field_names(annotation, f"{prefix}{name.upper()}{delimiter}", delimiter)
