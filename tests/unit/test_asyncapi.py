"""docs/asyncapi.yaml is what the pydantic contracts generate, a valid AsyncAPI 3.0 document, and
its payload schemas accept and reject messages as the models do.

Regenerate after changing ``service_shared.messages``::

    uv run python -m analysis_service.asyncapi docs/asyncapi.yaml

The document is validated against AsyncAPI's own JSON Schema (npm package ``@asyncapi/specs``,
file ``schemas/3.0.0-without-$id.json``) found at ``$ASYNCAPI_SCHEMA`` or in the user cache where
``.ci/run`` puts it; without it that test skips, except under ``CI``, where it fails.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml
from pydantic import BaseModel, ValidationError

from analysis_service.asyncapi import MESSAGES, asyncapi_document, main, render_asyncapi
from analysis_service.settings import RabbitSettings, RedisSettings
from service_shared.messages import AnalysisRequest, AnalysisResultMessage, ProgressMessage

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "docs" / "asyncapi.yaml"
CACHED_SPEC = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / (
    "analysis-service/asyncapi-3.0.0.json"
)

REQUEST = {"request_id": "req-1", "file": "album/01.flac", "priority": 7, "analyses": ["bpm", "key"]}
RESULT = {
    "request_id": "req-1",
    "status": "failed",
    "error": {"code": "file_not_found", "message": "no such file: album/01.flac"},
    "finished_at": "2026-01-01T12:00:00+00:00",
}
#: What ProgressStore publishes (tests/integration/test_progress_contract.py checks the real ones).
PROGRESS = {
    "request_id": "req-1",
    "status": "completed",
    "percent": 100.0,
    "stage": "done",
    "updated_at": "2026-01-01T12:00:00.123456+00:00",
    "finished_at": "2026-01-01T12:00:00.123456+00:00",
    "file": "album/01.flac",
    "duration_s": "183.4",
    "bpm": "124.0",
    "key": "A minor",
    "camelot": "8A",
    "mood": "energetic",
}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded = yaml.safe_load(DOCUMENT.read_text())
    assert isinstance(loaded, dict)
    return loaded


def payload_validator(document: dict[str, Any], message: str) -> Any:
    """A JSON Schema validator of ``message``'s payload, resolving refs within the document."""
    payload = document["components"]["messages"][message]["payload"]
    schema = {**payload, "components": document["components"]}
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def test_committed_document_is_up_to_date() -> None:
    assert DOCUMENT.read_text() == render_asyncapi(), (
        f"{DOCUMENT} is stale: run `uv run python -m analysis_service.asyncapi docs/asyncapi.yaml`"
    )


def test_main_writes_the_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out" / "asyncapi.yaml"
    assert main([str(target)]) == 0
    assert target.read_text() == render_asyncapi()
    assert "wrote" in capsys.readouterr().out
    assert main(["a", "b"]) == 2


def test_document_follows_the_asyncapi_3_schema(document: dict[str, Any]) -> None:
    path = Path(os.environ.get("ASYNCAPI_SCHEMA") or CACHED_SPEC)
    if not path.is_file():
        reason = f"AsyncAPI's JSON Schema is not at {path} (.ci/run fetches @asyncapi/specs)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI requires it", pytrace=False)
        pytest.skip(reason)
    spec = json.loads(path.read_text())
    errors = sorted(jsonschema.Draft7Validator(spec).iter_errors(document), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message[:300]}" for e in errors)
    # ...and the schema does reject a broken document (the validator is really checking).
    broken = {**document, "channels": {"x": {"address": 42}}}
    assert list(jsonschema.Draft7Validator(spec).iter_errors(broken))


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    found = list(refs(document))
    assert len(found) > 20
    for ref in found:
        assert ref.startswith("#/"), ref
        node: Any = document
        for part in ref[2:].split("/"):
            assert part in node, f"{ref} does not resolve"
            node = node[part]


def test_channels_and_operations_cover_the_three_messages(document: dict[str, Any]) -> None:
    channels = document["channels"]
    rabbit, redis = RabbitSettings(), RedisSettings()
    assert channels["requests"]["bindings"]["amqp"]["exchange"]["name"] == rabbit.request_exchange
    assert channels["requests"]["address"] == rabbit.request_routing_key
    assert channels["results"]["bindings"]["amqp"]["exchange"]["name"] == rabbit.results_exchange
    assert channels["deadLetters"]["address"] == rabbit.dead_letter_queue
    assert channels["requestProgress"]["address"] == f"{redis.key_prefix}:progress:{{request_id}}"
    assert channels["allProgress"]["address"] == f"{redis.key_prefix}:progress"
    sent = {
        op["messages"][0]["$ref"].rsplit("/", 1)[1]
        for op in document["operations"].values()
        if op["action"] == "send"
    }
    received = {
        op["messages"][0]["$ref"].rsplit("/", 1)[1]
        for op in document["operations"].values()
        if op["action"] == "receive"
    }
    assert received == {"AnalysisRequest"}
    assert {"AnalysisResult", "Progress"} <= sent
    assert set(document["components"]["messages"]) == set(MESSAGES)


def test_names_follow_the_settings() -> None:
    custom = asyncapi_document(
        RabbitSettings(request_exchange="in", results_exchange="out", results_queue=""),
        RedisSettings(key_prefix="music"),
    )
    assert custom["channels"]["requests"]["bindings"]["amqp"]["exchange"]["name"] == "in"
    assert custom["channels"]["results"]["bindings"]["amqp"]["exchange"]["name"] == "out"
    assert "No queue is declared" in custom["channels"]["results"]["description"]
    assert custom["channels"]["allProgress"]["address"] == "music:progress"


@pytest.mark.parametrize(
    ("message", "model", "sample"),
    [
        ("AnalysisRequest", AnalysisRequest, REQUEST),
        ("AnalysisResult", AnalysisResultMessage, RESULT),
        ("Progress", ProgressMessage, PROGRESS),
    ],
)
def test_payload_schemas_accept_what_the_models_accept(
    document: dict[str, Any], message: str, model: type[BaseModel], sample: dict[str, Any]
) -> None:
    payload_validator(document, message).validate(sample)
    parsed = model.model_validate(sample)
    payload_validator(document, message).validate(json.loads(parsed.model_dump_json(exclude_none=True)))


@pytest.mark.parametrize(
    ("message", "model", "sample"),
    [
        ("AnalysisRequest", AnalysisRequest, REQUEST | {"priority": 12}),
        ("AnalysisRequest", AnalysisRequest, REQUEST | {"colour": "red"}),
        ("AnalysisResult", AnalysisResultMessage, RESULT | {"status": "done"}),
        ("Progress", ProgressMessage, PROGRESS | {"percent": 101}),
        ("Progress", ProgressMessage, PROGRESS | {"status": "paused"}),
        ("Progress", ProgressMessage, {k: v for k, v in PROGRESS.items() if k != "stage"}),
    ],
)
def test_payload_schemas_reject_what_the_models_reject(
    document: dict[str, Any], message: str, model: type[BaseModel], sample: dict[str, Any]
) -> None:
    assert list(payload_validator(document, message).iter_errors(sample))
    with pytest.raises(ValidationError):
        model.model_validate(sample)


def test_progress_statuses_match_the_store() -> None:
    # A status the store accepts but the contract lacks would publish messages the schema rejects.
    from analysis_service.sinks.progress import PROGRESS_STATUSES
    from service_shared.messages import ProgressStatus

    assert {s.value for s in ProgressStatus} == set(PROGRESS_STATUSES)
