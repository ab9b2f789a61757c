"""Message contracts of the analysis service: requests in, results out (JSON over AMQP).

The JSON Schemas in ``docs/schemas/`` are generated from these models
(``analysis-service schema``); a test keeps them in sync.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator


class AnalysisKind(StrEnum):
    """An analysis a request can ask for."""

    BPM = "bpm"
    KEY = "key"
    MOOD = "mood"


class ResultStatus(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: Longest accepted ``file`` (characters).
MAX_FILE_CHARS = 4096
#: Most analyses one request may name.
MAX_ANALYSES = 32
#: Longest error message carried in a result (characters); longer ones are cut.
MAX_ERROR_CHARS = 2000
#: Request and correlation ids: printable ASCII without spaces, quotes or backslashes.
ID_PATTERN = r"^[A-Za-z0-9._:@/+=-]{1,200}$"
#: Analyzer names (built-in and plugins).
ANALYZER_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
#: A ``file``: no control characters (C0, DEL, C1).
FILE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]+$"
#: Tempi a ``bpm_range`` may name (the engine reports 40-240 BPM).
BPM_RANGE_LIMITS = (40.0, 240.0)
#: Least ``high / low`` of a ``bpm_range``: about an octave, so that every tempo has an octave in it
#: (DJ applications' ranges, 78-155 or 88-175, are 1.99).
BPM_RANGE_MIN_RATIO = 1.9

Bpm = Annotated[float, Field(ge=BPM_RANGE_LIMITS[0], le=BPM_RANGE_LIMITS[1])]


def bpm_range_from_text(text: str) -> tuple[float, float]:
    """``"88-175"`` (how DJ applications write a range), ``"[88, 175]"`` or ``"(88, 175)"`` as
    ``(88.0, 175.0)``.

    Raises ``ValueError`` naming the expected form; the bounds are checked by the models.
    """
    spelt = text.strip().strip("[]()")
    low, sep, high = spelt.replace(",", "-", 1).partition("-")
    try:
        if not sep:
            raise ValueError
        return float(low), float(high)
    except ValueError:
        raise ValueError(f"{text!r} is not LOW-HIGH in BPM, such as 88-175") from None


def check_bpm_range(value: tuple[float, float]) -> tuple[float, float]:
    """``value`` if it is about an octave wide (``high >= BPM_RANGE_MIN_RATIO * low``), else
    ``ValueError`` saying so (the bounds themselves are checked by the :data:`Bpm` fields)."""
    low, high = value
    if high < BPM_RANGE_MIN_RATIO * low:
        raise ValueError(
            f"bpm_range [{low:g}, {high:g}] is narrower than an octave: high must be at least "
            f"{BPM_RANGE_MIN_RATIO:g} x low ({BPM_RANGE_MIN_RATIO * low:g}), so that every tempo "
            "has an octave inside it or within 3 % of it"
        )
    return value


#: ``[low, high]``, checked by :func:`check_bpm_range`; its schema spelt without ``prefixItems``
#: (JSON Schema 2020-12 only), so that AsyncAPI's Draft-07 schemas check the bounds too.
BpmRange = Annotated[
    tuple[Bpm, Bpm],
    AfterValidator(check_bpm_range),
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": "number", "minimum": BPM_RANGE_LIMITS[0], "maximum": BPM_RANGE_LIMITS[1]},
            "minItems": 2,
            "maxItems": 2,
        }
    ),
]


#: Request options added after the first release: left out of the published body and of a request's
#: fingerprint while unset (:meth:`AnalysisRequest.wire_json`).
LATER_OPTIONS: tuple[str, ...] = ("bpm_range",)


class RequestOptions(BaseModel):
    """Optional per-request tuning; every field defaults to the worker's settings."""

    model_config = ConfigDict(extra="forbid")

    timeline: bool | None = Field(
        default=None,
        description="Force (true) or suppress (false) the segment timeline; default: only for files "
        "longer than the worker's timeline threshold.",
    )
    use_cache: bool = Field(default=True, description="Reuse a cached result for identical audio.")
    bpm_range: BpmRange | None = Field(
        default=None,
        description="`[low, high]` in BPM: report the tempo (and each timeline segment's) at the "
        "metrical level within this range, as DJ applications do: `[88, 175]` reads drum & bass "
        "at 170, `[78, 155]` reads it at 85. A tempo already inside it is kept. Within 40-240 and "
        "at least about an octave wide (high >= 1.9 x low): in the gap of a range narrower than an "
        "octave (175.5 for 88-175) the nearer octave is reported, at most 3 % outside. Other "
        "analyses (mood) are unaffected. Default: the worker's engine.bpm_range, else the level a "
        "listener most likely taps.",
    )

    def unset_later_options(self) -> set[str]:
        """The :data:`LATER_OPTIONS` left unset: left out of the published body and the fingerprint."""
        return {name for name in LATER_OPTIONS if getattr(self, name) is None}


class AnalysisRequest(BaseModel):
    """A request to analyse one file of the media library."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    request_id: str = Field(
        pattern=ID_PATTERN,
        description="Idempotency key: a redelivered or resubmitted request with the same id never "
        "creates a second result. 1-200 characters of A-Z a-z 0-9 . _ : @ / + = -.",
    )
    file: str = Field(
        min_length=1,
        max_length=MAX_FILE_CHARS,
        pattern=FILE_PATTERN,
        description="Path of the audio file, relative to (or inside) the media root; no control characters.",
    )
    priority: int = Field(default=5, ge=0, le=9, description="0 (lowest) to 9 (highest).")
    analyses: list[Annotated[str, Field(pattern=ANALYZER_NAME_PATTERN)]] = Field(
        default_factory=lambda: [kind.value for kind in AnalysisKind],
        min_length=1,
        max_length=MAX_ANALYSES,
        json_schema_extra={"uniqueItems": True},
        description="Which analyzers to run: distinct names of built-in (bpm, key, mood) or installed "
        "plugin analyzers (default: the built-ins). An unknown name fails with `unknown_analyzer`.",
    )
    correlation_id: str | None = Field(default=None, pattern=ID_PATTERN)
    options: RequestOptions = Field(default_factory=RequestOptions)

    @field_validator("analyses")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("analyses must not repeat a name")
        return names

    def wire_json(self) -> str:
        """The request as producers publish it: its JSON without the options added since the first
        release (:data:`LATER_OPTIONS`) while they are unset, which a worker of a previous release,
        refusing unknown fields, would fail as ``invalid_request`` during a rolling upgrade."""
        unset = self.options.unset_later_options()
        return self.model_dump_json(exclude={"options": unset} if unset else None)


class TempoResult(BaseModel):
    bpm: float = Field(description="Global tempo in beats per minute.")
    confidence: float = Field(ge=0.0, le=1.0)


class KeyResult(BaseModel):
    key: str = Field(description='Tonic and mode, e.g. "A minor".')
    tonic: str
    mode: Literal["major", "minor"]
    camelot: str = Field(description='Camelot wheel notation, e.g. "8A".')
    confidence: float = Field(ge=0.0, le=1.0)


class MoodResult(BaseModel):
    energy: float = Field(ge=0.0, le=1.0)
    valence: float = Field(ge=0.0, le=1.0)
    danceability: float = Field(ge=0.0, le=1.0)
    label: str
    confidence: float = Field(ge=0.0, le=1.0)


class Segment(BaseModel):
    start_s: float
    end_s: float
    bpm: float | None = None
    key: str | None = None


class TrackTags(BaseModel):
    """Metadata embedded in the file (ID3, MP4 atoms, Vorbis comments, ASF, APEv2), as found.

    Untrusted text: control characters are removed and each value is cut at 500 characters. A
    field the file does not carry, or carries in a form that makes no sense, is null.
    """

    title: str | None = None
    artist: str | None = None
    album: str | None = None
    track_number: int | None = Field(
        default=None, description="Track number on its release (ID3 TRCK, MP4 trkn)."
    )
    year: int | None = Field(default=None, description="Year of the recording or release date tag.")
    genre: str | None = None
    isrc: str | None = Field(
        default=None, description="International Standard Recording Code, e.g. USRC17607839."
    )
    bpm: float | None = Field(
        default=None, description="Tempo tag (ID3 TBPM, MP4 tmpo, Vorbis/APE BPM, WM/BeatsPerMinute), 20-999."
    )
    key: str | None = Field(
        default=None,
        description='Key tag as written (ID3 TKEY, INITIALKEY, KEY, WM/InitialKey), e.g. "Am", "8A", "1m".',
    )
    codec: str | None = Field(default=None, description='Codec the decoder found, e.g. "mp3", "aac", "flac".')
    bitrate_kbps: int | None = Field(default=None, description="Bit rate in kbit/s.")


class TagCheck(BaseModel):
    """How the file's BPM and key tags relate to the measured tempo and key (null: nothing to compare)."""

    bpm: Literal["match", "double", "half", "other"] | None = Field(
        default=None,
        description="match: within 4 %; double: the measured tempo is twice the tag's; half: half of it.",
    )
    bpm_tagged: float | None = None
    bpm_measured: float | None = None
    key: Literal["match", "relative", "parallel", "fifth", "other"] | None = Field(
        default=None,
        description="relative: same notes, other mode (8A/8B); parallel: same tonic, other mode; "
        "fifth: same mode a fifth apart (a Camelot neighbour).",
    )
    key_tagged: str | None = Field(default=None, description='The tag parsed, e.g. "A minor".')
    key_measured: str | None = None


class EngineOutput(BaseModel):
    """What the analysis engine found in one file."""

    duration_s: float
    source_sample_rate: int
    source_channels: int
    format: str
    tempo: TempoResult | None = None
    key: KeyResult | None = None
    mood: MoodResult | None = None
    timeline: list[Segment] | None = None
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Results of third-party analyzers, by analyzer name."
    )
    analyzer_versions: dict[str, str]
    timings_s: dict[str, float] = Field(description="Seconds spent per stage (decode, features, ...).")
    tags: TrackTags | None = Field(default=None, description="Metadata embedded in the file.")
    tag_check: TagCheck | None = Field(
        default=None, description="Where the file's BPM or key tag agrees or disagrees with the measurement."
    )


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. `file_not_found`.")
    message: str = Field(description=f"What failed and why (at most {MAX_ERROR_CHARS} characters).")

    @field_validator("message")
    @classmethod
    def _bounded(cls, message: str) -> str:
        if len(message) <= MAX_ERROR_CHARS:
            return message
        return message[: MAX_ERROR_CHARS - 13] + " [truncated]"


class AnalysisResultMessage(BaseModel):
    """Outcome of one request, published on the results exchange."""

    schema_version: Literal[1] = 1
    request_id: str = Field(
        description="The request's id; for a message that could not be keyed by its own id (invalid, or "
        "reusing the id of another request) an id derived from its body, `rejected-<digest>`."
    )
    claimed_request_id: str | None = Field(
        default=None,
        description="The id the rejected message claimed, when `request_id` had to be derived.",
    )
    correlation_id: str | None = None
    status: ResultStatus
    file: str | None = None
    content_hash: str | None = None
    output: EngineOutput | None = None
    error: ErrorInfo | None = None
    cached: bool = False
    finished_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class ProgressStatus(StrEnum):
    """State of a request in its progress updates."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ProgressMessage(BaseModel):
    """One progress update of a request, published as JSON on Redis pub/sub.

    Sent on ``{prefix}:progress:{request_id}`` (one request) and ``{prefix}:progress`` (all), with
    the same fields as the hash ``{prefix}:progress:{request_id}`` that pollers read (see
    ``analysis_service/sinks/progress.py``). Optional fields are absent, not null, when unset.
    """

    request_id: str
    status: ProgressStatus
    percent: float = Field(ge=0.0, le=100.0, description="Progress, 0 to 100.")
    stage: str = Field(
        description="What is happening, e.g. `started`, `decode`, `features`, `done`, `failed`."
    )
    updated_at: datetime = Field(description="When this update was made (ISO 8601, UTC).")
    finished_at: datetime | None = Field(
        default=None, description="Set by the update with status `completed` or `failed`."
    )
    error_code: str | None = Field(
        default=None, description="Why it failed: a stable error code such as `file_not_found`."
    )
    error: str | None = Field(default=None, description="Why it failed, human-readable.")
    correlation_id: str | None = Field(default=None, description="The request's correlation id, once known.")
    file: str | None = Field(default=None, description="The request's file, once known.")
    duration_s: str | None = Field(
        default=None, description="When completed: the audio duration in seconds, e.g. `183.4`."
    )
    bpm: str | None = Field(default=None, description="When completed: the tempo in BPM, e.g. `124.0`.")
    key: str | None = Field(default=None, description="When completed: the key, e.g. `A minor`.")
    camelot: str | None = Field(default=None, description="When completed: the Camelot code, e.g. `8A`.")
    mood: str | None = Field(default=None, description="When completed: the mood label.")
