"""The job API (``analysis-service api``): submit, follow, fetch and cancel analyses over HTTP.

See :mod:`analysis_service.api.app` and ``docs/api.md``.
"""

from analysis_service.api.app import create_app, serve

__all__ = ["create_app", "serve"]
