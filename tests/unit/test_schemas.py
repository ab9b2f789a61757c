"""The committed JSON Schemas (docs/schemas/) match the message models and validate like them.

Regenerate after changing ``service_shared.messages``::

    uv run analysis-service schema docs/schemas
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
from pydantic import BaseModel, ValidationError

from service_shared.messages import (
    AnalysisKind,
    AnalysisRequest,
    AnalysisResultMessage,
    EngineOutput,
    ErrorInfo,
    KeyResult,
    ResultStatus,
    TempoResult,
)

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "docs" / "schemas"
MODELS: dict[str, type[BaseModel]] = {
    "analysis_request": AnalysisRequest,
    "analysis_result": AnalysisResultMessage,
}

VALID_REQUEST: dict[str, Any] = {
    "schema_version": 1,
    "request_id": "req-2024-06-01/42",
    "file": "albums/artist/01 - track.flac",
    "priority": 7,
    "analyses": ["bpm", "key"],
    "correlation_id": "batch-17",
    "options": {"timeline": True, "use_cache": False},
}


def render(model: type[BaseModel]) -> str:
    """The schema file's exact content (same as ``analysis-service schema``)."""
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"


def schema(name: str) -> dict[str, Any]:
    loaded = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    assert isinstance(loaded, dict)
    return loaded


def validator(name: str) -> Any:
    document = schema(name)
    jsonschema.Draft202012Validator.check_schema(document)
    return jsonschema.Draft202012Validator(document)


@pytest.mark.parametrize(("name", "model"), sorted(MODELS.items()))
def test_committed_schema_is_up_to_date(name: str, model: type[BaseModel]) -> None:
    path = SCHEMA_DIR / f"{name}.schema.json"
    assert path.read_text() == render(model), (
        f"{path} is stale: run `uv run analysis-service schema docs/schemas` and commit the result"
    )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_committed_schema_is_a_valid_json_schema(name: str) -> None:
    jsonschema.Draft202012Validator.check_schema(schema(name))


def test_sample_request_is_valid_for_both() -> None:
    validator("analysis_request").validate(VALID_REQUEST)
    request = AnalysisRequest.model_validate(VALID_REQUEST)
    assert request.priority == 7
    assert request.analyses == [AnalysisKind.BPM, AnalysisKind.KEY]


def test_minimal_request_is_valid_for_both() -> None:
    minimal = {"request_id": "r1", "file": "a.wav"}
    validator("analysis_request").validate(minimal)
    request = AnalysisRequest.model_validate(minimal)
    assert (request.priority, request.analyses) == (5, list(AnalysisKind))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"priority": 12}, "priority"),
        ({"priority": -1}, "priority"),
        ({"request_id": "has space"}, "request_id"),
        ({"file": ""}, "file"),
        ({"analyses": ["Not A Name"]}, "analyses"),
        ({"analyses": []}, "analyses"),
        ({"analyses": ["bpm", "bpm"]}, "analyses"),
        ({"analyses": [f"a{i}" for i in range(40)]}, "analyses"),
        ({"file": "tab\there.wav"}, "file"),
        ({"file": "x" * 5000}, "file"),
        ({"correlation_id": "new\nline"}, "correlation_id"),
        ({"schema_version": 2}, "schema_version"),
        ({"unexpected": True}, None),
        ({"options": {"timeline": True, "colour": "red"}}, "options"),
        ({"options": {"bpm_range": [30, 100]}}, "options"),
        ({"options": {"bpm_range": [120, 250]}}, "options"),
        ({"options": {"bpm_range": [88]}}, "options"),
        ({"options": {"bpm_range": [88, 175, 200]}}, "options"),
        ({"options": {"bpm_range": "88-175"}}, "options"),
    ],
)
def test_invalid_request_is_rejected_by_both(change: dict[str, Any], field: str | None) -> None:
    sample = VALID_REQUEST | change
    errors = list(validator("analysis_request").iter_errors(sample))
    assert errors, f"the JSON Schema accepted {change}"
    if field is not None:
        assert {e.path[0] if e.path else None for e in errors} == {field}
    with pytest.raises(ValidationError) as caught:
        AnalysisRequest.model_validate(sample)
    if field is not None:
        assert {err["loc"][0] for err in caught.value.errors()} == {field}


def test_a_bpm_range_narrower_than_an_octave_is_refused_by_the_model() -> None:
    # JSON Schema cannot compare two items; the rule is in the field's description.
    sample = VALID_REQUEST | {"options": {"bpm_range": [88, 150]}}
    assert (
        "1.9 x low"
        in schema("analysis_request")["$defs"]["RequestOptions"]["properties"]["bpm_range"]["description"]
    )
    with pytest.raises(ValidationError, match="narrower than an octave"):
        AnalysisRequest.model_validate(sample)
    ok = AnalysisRequest.model_validate(VALID_REQUEST | {"options": {"bpm_range": [88, 175]}})
    assert ok.options.bpm_range == (88.0, 175.0)


def test_priority_12_is_rejected_by_both() -> None:
    sample = VALID_REQUEST | {"priority": 12}
    with pytest.raises(jsonschema.ValidationError) as by_schema:
        validator("analysis_request").validate(sample)
    assert by_schema.value.validator == "maximum"
    with pytest.raises(ValidationError, match="less than or equal to 9"):
        AnalysisRequest.model_validate(sample)


def test_results_validate_against_the_result_schema() -> None:
    completed = AnalysisResultMessage(
        request_id="r1",
        status=ResultStatus.COMPLETED,
        file="a.wav",
        content_hash="ab" * 32,
        output=EngineOutput(
            duration_s=30.0,
            source_sample_rate=44100,
            source_channels=2,
            format="WAV",
            tempo=TempoResult(bpm=124.0, confidence=0.9),
            key=KeyResult(key="A minor", tonic="A", mode="minor", camelot="8A", confidence=0.8),
            analyzer_versions={"tempo": "1"},
            timings_s={"decode": 0.1},
        ),
    )
    failed = AnalysisResultMessage(
        request_id="r2", status=ResultStatus.FAILED, error=ErrorInfo(code="file_not_found", message="x")
    )
    check = validator("analysis_result")
    for result in (completed, failed):
        document = json.loads(result.model_dump_json())
        check.validate(document)
        assert AnalysisResultMessage.model_validate(document) == result

    wrong = json.loads(failed.model_dump_json()) | {"status": "done"}
    assert list(check.iter_errors(wrong))
    with pytest.raises(ValidationError):
        AnalysisResultMessage.model_validate(wrong)


def test_the_published_body_leaves_out_an_unset_bpm_range() -> None:
    # A worker of the previous release refuses unknown options: during a rolling upgrade a body
    # that names bpm_range (even as null) would fail there as invalid_request.
    from analysis_service.worker.topology import request_message

    request = AnalysisRequest.model_validate(VALID_REQUEST)
    body = json.loads(request_message(request, app_id="test").body)
    assert body["options"] == {"timeline": True, "use_cache": False}
    assert AnalysisRequest.model_validate(body) == request

    ranged = AnalysisRequest.model_validate(VALID_REQUEST | {"options": {"bpm_range": [88, 175]}})
    body = json.loads(request_message(ranged, app_id="test").body)
    assert body["options"]["bpm_range"] == [88.0, 175.0]
    assert AnalysisRequest.model_validate(body) == ranged
