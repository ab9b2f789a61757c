"""Base class for service settings read from the environment."""

from __future__ import annotations

from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Settings every service has: its name and how it logs.

    Subclasses add one nested model per backend; nested fields are read from variables such as
    ``ANALYSIS_POSTGRES__DSN`` (prefix, field, ``__``, sub-field).
    """

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="ignore")

    service_name: str = "service"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
