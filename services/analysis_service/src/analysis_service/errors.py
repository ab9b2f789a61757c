"""Every error the service raises, under one root.

``PermanentError`` subclasses mean "this request can never succeed": the worker publishes a failed
result with the error's ``code`` and dead-letters the message. ``TransientError`` subclasses mean
"retry later": the message is never acked as done while one is outstanding.

The exceptions pickle with their message and path, so they cross the process pool intact.
"""

from __future__ import annotations

from typing import ClassVar


class AnalysisServiceError(Exception):
    """Root of the service's errors. ``code`` is stable and machine-readable."""

    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.message, self.path))

    def __str__(self) -> str:
        return f"{self.message} ({self.path})" if self.path else self.message


def _rebuild(cls: type[AnalysisServiceError], message: str, path: str | None) -> AnalysisServiceError:
    return cls(message, path=path)


class PermanentError(AnalysisServiceError):
    """The request cannot succeed, however often it is retried."""

    code = "permanent_error"


class InvalidRequest(PermanentError):
    """The message does not match the request contract (the generic case)."""

    code = "invalid_request"


class RequestTooLarge(InvalidRequest):
    """The message body is larger than ``worker.max_body_bytes`` (checked before parsing)."""

    code = "request_too_large"


class InvalidEncoding(InvalidRequest):
    """The body is not UTF-8."""

    code = "invalid_encoding"


class MalformedJson(InvalidRequest):
    """The body is not a JSON object."""

    code = "malformed_json"


class InvalidRequestId(InvalidRequest):
    code = "invalid_request_id"


class InvalidCorrelationId(InvalidRequest):
    """``correlation_id`` does not match the id pattern (e.g. holds a control character)."""

    code = "invalid_correlation_id"


class InvalidFile(InvalidRequest):
    """``file`` is missing, too long or holds control characters."""

    code = "invalid_file"


class InvalidPriority(InvalidRequest):
    code = "invalid_priority"


class InvalidAnalyses(InvalidRequest):
    """``analyses`` is empty, too long, repeats a name or holds a malformed name."""

    code = "invalid_analyses"


class InvalidOptions(InvalidRequest):
    """``options`` holds an unknown field or a value the contract refuses (a ``bpm_range`` that is
    not an octave wide, say)."""

    code = "invalid_options"


class RequestIdConflict(InvalidRequest):
    """The request id already belongs to a different request (another file or options)."""

    code = "request_id_conflict"


class PathOutsideMediaRoot(PermanentError):
    code = "path_outside_media_root"


class AudioInputError(PermanentError):
    """The file is not something the engine can analyse."""

    code = "bad_audio"


class FileMissing(AudioInputError):
    code = "file_not_found"


class FileUnreadable(AudioInputError):
    code = "file_unreadable"


class EmptyFile(AudioInputError):
    code = "empty_file"


class NotAudio(AudioInputError):
    code = "not_audio"


class TruncatedAudio(AudioInputError):
    code = "truncated_audio"


class CorruptAudio(AudioInputError):
    """Many packets of the file fail to decode (damaged data, not just a cut end)."""

    code = "corrupt_audio"


class SilentAudio(AudioInputError):
    code = "silent_audio"


class TooShort(AudioInputError):
    code = "too_short"


class TooLong(AudioInputError):
    code = "too_long"


class UnsupportedAudio(AudioInputError):
    """Sample rate or channel count outside what the engine accepts."""

    code = "unsupported_audio"


class DecoderUnavailable(AudioInputError):
    """No decoder handles this audio format (a codec FFmpeg does not decode)."""

    code = "decoder_unavailable"


class InternalError(PermanentError):
    """A bug: the engine or a store raised something it should not have. Reported, never retried."""

    code = "internal_error"


class UnknownAnalyzer(InvalidRequest):
    code = "unknown_analyzer"


class Cancelled(PermanentError):
    """The request was cancelled (through the job API) before it finished."""

    code = "cancelled"


class SinkRejected(PermanentError):
    """A store answered but refused this outcome's data (a bug or data the contract let through).

    The worker then stores and publishes a minimal failed outcome in its place.
    """

    code = "store_rejected"


class AnalysisTimeout(PermanentError):
    """The analysis ran past its time limit and was killed."""

    code = "analysis_timeout"


class WorkerCrashed(PermanentError):
    """The pool process running the analysis died (again) — e.g. killed by the OOM killer."""

    code = "worker_crashed"


class TransientError(AnalysisServiceError):
    """Retry later: a dependency is down or overloaded."""

    code = "transient_error"


class SinkUnavailable(TransientError):
    """A result store (PostgreSQL, Neo4j, results exchange, Redis) could not be written."""

    code = "sink_unavailable"


class SubmitError(TransientError):
    """``submit``: the requests could not be handed to RabbitMQ."""

    code = "submit_failed"


class TopologyMissing(SubmitError):
    """``submit``: the request exchange, or a queue bound to it, does not exist (yet)."""

    code = "topology_missing"


# ------------------------------------------------------------------------------------- job API
# Answers of the job API (``analysis_service.api``) to HTTP clients, never stored as a request's
# outcome: refusals (``ApiError``, ``status`` is the HTTP status) and unavailable stores (503).


class ApiError(PermanentError):
    """The job API refused an HTTP request (repeating it unchanged cannot succeed)."""

    status: ClassVar[int] = 400
    code = "bad_request"


class TooManyFiles(ApiError):
    """``files`` is empty or longer than ``api.max_files``."""

    status = 422
    code = "too_many_files"


class InvalidQuery(ApiError):
    """A query or path parameter is out of range (``status``, ``limit``, ...)."""

    status = 422
    code = "invalid_query"


class InvalidCursor(ApiError):
    """The ``cursor`` of ``GET /v1/jobs`` was not one the API handed out."""

    status = 400
    code = "invalid_cursor"


class ApiKeyMissing(ApiError):
    """No ``Authorization: Bearer <key>`` header, or a malformed one."""

    status = 401
    code = "missing_api_key"


class ApiKeyRejected(ApiError):
    """The bearer key is not one of ``api.keys``."""

    status = 403
    code = "invalid_api_key"


class JobNotFound(ApiError):
    status = 404
    code = "job_not_found"


class BatchNotFound(ApiError):
    status = 404
    code = "batch_not_found"


class JobNotFinished(ApiError):
    """The job has no outcome yet (its result was asked for)."""

    status = 409
    code = "job_not_finished"


class JobFinished(ApiError):
    """The job already has its terminal outcome (it was asked to be cancelled)."""

    status = 409
    code = "job_finished"


class BatchFinished(ApiError):
    """Every job of the batch already has its terminal outcome (it was asked to be cancelled)."""

    status = 409
    code = "batch_finished"


class BrokerUnavailable(TransientError):
    """The job API: RabbitMQ did not take (confirm) a submission's requests; nothing was accepted (503)."""

    code = "broker_unavailable"


class LedgerUnavailable(TransientError):
    """The job API: PostgreSQL (the outcome ledger) could not be read or written (503)."""

    code = "ledger_unavailable"
