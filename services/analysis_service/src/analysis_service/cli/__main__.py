"""``python -m analysis_service.cli`` runs the command line."""

from analysis_service.cli.main import app

app()
