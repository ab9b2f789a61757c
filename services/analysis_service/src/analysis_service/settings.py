"""The service's settings: one object, built once at the entry point and passed explicitly.

Every field can be set from the environment with the ``ANALYSIS_`` prefix; nested models use ``__``
(``ANALYSIS_POSTGRES__DSN``, ``ANALYSIS_WORKER__CONCURRENCY``). ``.env.example`` lists them all.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from service_shared.messages import BpmRange, bpm_range_from_text
from service_shared.settings import ServiceSettings


class EngineSettings(BaseModel):
    """How audio is decoded and analysed (also used by the local ``analyze`` command)."""

    sample_rate: int = Field(default=22050, description="Analysis sample rate (Hz).")
    max_duration_s: float = Field(default=4 * 3600.0, gt=0, description="Longer files are refused.")
    timeline_threshold_s: float = Field(
        default=600.0, ge=0, description="Files longer than this also get a segment timeline."
    )
    min_source_rate: int = Field(default=8000, description="Lowest accepted source sample rate (Hz).")
    max_source_rate: int = Field(default=384000, description="Highest accepted source sample rate (Hz).")
    max_channels: int = Field(default=8, description="Most accepted source channels.")
    bpm_range: Annotated[BpmRange | None, NoDecode] = Field(
        default=None,
        description="Default of the requests' options.bpm_range, as LOW-HIGH (88-175) or [88,175]: "
        "report every tempo at the metrical level within this range, as DJ applications do (a "
        "request's own range replaces it). Default: the level a listener most likely taps.",
    )

    @field_validator("bpm_range", mode="before")
    @classmethod
    def _from_text(cls, value: object) -> object:
        return bpm_range_from_text(value) if isinstance(value, str) and value.strip() else value or None


class RabbitSettings(BaseModel):
    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    request_exchange: str = "analysis.requests"
    request_queue: str = "analysis.requests"
    request_routing_key: str = "analysis.request"
    urgent_queue: str = Field(
        default="analysis.requests.urgent",
        description="Queue of the urgent requests (priority >= urgent_priority), consumed by every "
        "worker on a channel of its own, so that an urgent request is delivered while the request "
        "queue's window is full; empty: no urgent queue, every request goes to request_queue. Set "
        "the same value on the workers and the producers (API, submit).",
    )
    urgent_routing_key: str = Field(
        default="analysis.request.urgent", description="Binds the urgent queue to the request exchange."
    )
    urgent_retry_queue: str = Field(
        default="analysis.requests.urgent.retry",
        description="Holds urgent requests requeued with a delay for retry_delay_s, then dead-letters "
        "them back to the urgent queue (declared with the urgent queue).",
    )
    urgent_priority: int = Field(
        default=9,
        ge=1,
        le=9,
        description="Requests of this priority or higher are published to the urgent queue (and run "
        "in the workers' urgent slots).",
    )
    dead_letter_exchange: str = "analysis.dlx"
    dead_letter_queue: str = "analysis.requests.dead"
    retry_queue: str = Field(
        default="analysis.requests.retry",
        description="Holds requests requeued with a delay (stores down) for retry_delay_s, then "
        "dead-letters them back to the request exchange.",
    )
    retry_delay_s: float = Field(default=15.0, gt=0, description="Delay of a requeue-with-delay (s).")
    results_exchange: str = "analysis.results"
    results_queue: str = Field(
        default="analysis.results.all",
        description="Durable queue bound to every result (so none is unroutable); empty: none.",
    )
    results_queue_max_length: int = Field(
        default=100_000,
        ge=1,
        description="The results queue keeps at most this many messages (the oldest are dropped), so "
        "it cannot grow without bound when nobody consumes it.",
    )
    results_queue_ttl_s: int = Field(
        default=7 * 24 * 3600, ge=1, description="Results older than this leave the results queue."
    )
    queue_type: Literal["classic", "quorum"] = Field(
        default="classic",
        description="classic: x-max-priority, one node, poison requests counted in the ledger; "
        "quorum: replicated, the broker's delivery count finds poison requests.",
    )
    quorum_delivery_limit: int = Field(
        default=20,
        ge=1,
        description="x-delivery-limit of a quorum request queue: the broker's own backstop, above "
        "worker.max_deliveries (the worker fails a poison request first, with an outcome).",
    )
    max_priority: int = Field(default=10, ge=1, le=255)
    consumer_timeout_ms: int = Field(
        default=3_600_000, description="x-consumer-timeout of the request queue (must exceed time limit)."
    )
    publish_timeout_s: float = 10.0
    reconnect_grace_s: float = Field(
        default=120.0, description="Exit non-zero when the consumer has been gone this long."
    )


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "analysis"
    progress_ttl_s: int = 7 * 24 * 3600
    cache_ttl_s: int = 30 * 24 * 3600
    socket_timeout_s: float = 2.0


class PostgresSettings(BaseModel):
    dsn: str = "postgresql://postgres@127.0.0.1:5432/test"
    min_pool_size: int = 1
    max_pool_size: int = 4
    command_timeout_s: float = 30.0


class Neo4jSettings(BaseModel):
    uri: str = "bolt://127.0.0.1:7687"
    user: str = "neo4j"
    password: str = "neo4j-password"
    database: str | None = Field(default=None, description="None: the server's default database.")


class WorkerSettings(BaseModel):
    media_root: Path = Path("/media")
    concurrency: int | None = Field(
        default=None, ge=1, description="Analysis slots; default: the CPUs this process may use."
    )
    spare_slots: int = Field(
        default=1,
        ge=0,
        description="Analysis processes beyond the slots: the request in one reads its file's header, "
        "hashes it and checks the cache while the slots' analyses run, then analyses as soon as one "
        "ends (at most concurrency analyses run at once). 0: a request is inspected in its slot "
        "right before its analysis, and the slot's CPU waits meanwhile.",
    )
    share_host_cpus: bool = Field(
        default=True,
        description="An analysis holds one of the host's CPU tokens (lock files in host_cpus_dir, one "
        "per CPU of this process's CPU set) while its process works, so that workers sharing the "
        "folder never run more analyses at once than the CPUs. False: slots run regardless.",
    )
    host_cpus_dir: Path | None = Field(
        default=None,
        description="Folder of the host CPU tokens, shared by the workers that use it (the same "
        "path in every container; they must be able to open each other's files). Unset: "
        "analysis-service-cpus in the temporary folder, shared on a host, per container.",
    )
    urgent_slots: int = Field(
        default=1,
        ge=0,
        description="Analysis processes kept for the urgent queue's requests beyond the slots: such a "
        "request runs in one at once, sharing the CPUs (it takes no host CPU token), and the worker "
        "takes no more urgent requests than these can start. 0: urgent requests run in the slots, "
        "ahead of the others.",
    )
    slot_nice: int = Field(
        default=5,
        ge=0,
        le=19,
        description="Niceness added to the slots' analysis processes (not the urgent slots'): an urgent "
        "analysis running beside busy slots gets most of a CPU, and the main process and any store "
        "on the host are served before the analyses. 0: all at the worker's own niceness.",
    )
    max_tasks_per_child: int = Field(
        default=200,
        ge=1,
        description="Recycle an analysis process after N requests (the worker) or files (analyze).",
    )
    overlap_stores: bool = Field(
        default=True,
        description=(
            "Fetch the next delivery just before an analysis ends (prefetch_lead_s), while its "
            "request is then stored and announced (the prefetch grows by one per such request; "
            "classic queues). "
            "False: prefetch = slots, and a freed slot waits for its request's stores."
        ),
    )
    prefetch_lead_s: float = Field(
        default=0.05,
        ge=0,
        description=(
            "With overlap_stores: fetch that next delivery this many seconds before an analysis is "
            "expected to end (from its progress), so that it has passed its ledger check when the "
            "slot frees. 0: when the analysis ends."
        ),
    )
    time_limit_base_s: float = Field(default=60.0, gt=0)
    time_limit_per_audio_minute_s: float = Field(default=2.0, gt=0)
    time_limit_max_s: float = Field(
        default=1500.0,
        gt=0,
        description="Cap of the time limit. With persist_deadline_s it stays below 30 minutes, the "
        "consumer timeout of brokers older than 3.12 that ignore the queue's x-consumer-timeout.",
    )
    persist_deadline_s: float = Field(
        default=240.0, gt=0, description="Keep retrying the stores this long, then requeue the request."
    )
    crash_retries: int = Field(default=1, ge=0, description="Retries after a pool process died.")
    max_deliveries: int = Field(
        default=3,
        ge=1,
        description="Fail a request started this many times without finishing (it kills workers).",
    )
    max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Larger request bodies fail (request_too_large) unparsed."
    )
    cancel_poll_s: float = Field(
        default=1.0,
        gt=0,
        description="How often in-flight requests renew their lease and are checked for a cancellation.",
    )
    lease_s: float = Field(
        default=15.0,
        gt=0,
        description="A request whose lease was renewed this recently is running elsewhere: another "
        "delivery of it waits (requeued with a delay). Must exceed 3 x cancel_poll_s.",
    )
    max_rss_mb: float = Field(default=4096.0, description="Pause consuming above this process-tree RSS.")
    max_system_memory_percent: float = Field(default=90.0, le=100)
    shutdown_grace_s: float = Field(default=60.0, ge=0)
    sink_retry_attempts: int = Field(default=5, ge=1)
    sink_retry_max_wait_s: float = Field(default=30.0, gt=0)
    breaker_threshold: int = Field(default=5, ge=1, description="Failures that open a circuit breaker.")
    breaker_ttl_s: float = Field(default=30.0, gt=0, description="Seconds a breaker stays open.")

    def host_cpus_base(self) -> Path:
        """The folder of the host CPU tokens: ``host_cpus_dir``, else one in the temporary folder."""
        return self.host_cpus_dir or Path(tempfile.gettempdir()) / "analysis-service-cpus"


class HttpSettings(BaseModel):
    host: str = "0.0.0.0"
    port: int = 8080


#: Most files one job-API submission can list whatever ``api.max_files`` says: the request model
#: refuses a longer list before validating its items (each bad item of a long list would otherwise
#: cost an error object).
MAX_SUBMISSION_FILES = 100_000


class ApiSettings(BaseModel):
    """The job API (``analysis-service api``): an HTTP front end to the request exchange and the ledger."""

    keys: SecretStr | None = Field(
        default=None,
        description="Comma-separated API keys clients send as `Authorization: Bearer <key>`; the API "
        "refuses to start without one.",
    )
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535, description="Listen port (0: a free one).")
    max_files: int = Field(
        default=10_000,
        ge=1,
        le=MAX_SUBMISSION_FILES,
        description="Most files one submission (batch) may list.",
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Larger request bodies are refused unread (413)."
    )
    stream_queue_size: int = Field(
        default=256, ge=1, description="Events buffered per stream client; beyond it the oldest is dropped."
    )
    stream_poll_s: float = Field(
        default=5.0, gt=0, description="Streams re-read the ledger this often (seconds) between events."
    )

    def key_list(self) -> list[str]:
        """The configured keys (blank entries dropped)."""
        if self.keys is None:
            return []
        return [key.strip() for key in self.keys.get_secret_value().split(",") if key.strip()]


class Settings(ServiceSettings):
    """All settings of the analysis service."""

    # Also read from ./.env or the file named by ANALYSIS_ENV_FILE (environment variables win), and
    # unknown ANALYSIS_* names are listed by Settings.unknown_env_names(): see ServiceSettings.
    model_config = SettingsConfigDict(
        env_prefix="ANALYSIS_", env_nested_delimiter="__", extra="ignore", env_parse_none_str=""
    )

    service_name: str = "analysis-service"
    engine: EngineSettings = Field(default_factory=EngineSettings)
    rabbitmq: RabbitSettings = Field(default_factory=RabbitSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    neo4j: Neo4jSettings = Field(default_factory=Neo4jSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> Settings:
        if self.worker.lease_s <= 3 * self.worker.cancel_poll_s:
            raise ValueError(
                f"worker.lease_s ({self.worker.lease_s}) must exceed 3 x worker.cancel_poll_s "
                f"({self.worker.cancel_poll_s})"
            )
        return self

    @model_validator(mode="after")
    def _delivery_limit_above_max_deliveries(self) -> Settings:
        """The broker's delivery limit must not dead-letter a request before the worker fails it."""
        if self.rabbitmq.quorum_delivery_limit <= self.worker.max_deliveries:
            raise ValueError(
                f"rabbitmq.quorum_delivery_limit ({self.rabbitmq.quorum_delivery_limit}) must exceed "
                f"worker.max_deliveries ({self.worker.max_deliveries})"
            )
        return self

    @model_validator(mode="after")
    def _limits_below_consumer_timeout(self) -> Settings:
        """A delivery must be settled before RabbitMQ's consumer timeout closes its channel."""
        budget_ms = 1000 * (self.worker.time_limit_max_s + self.worker.persist_deadline_s)
        if budget_ms >= self.rabbitmq.consumer_timeout_ms:
            raise ValueError(
                "worker.time_limit_max_s + worker.persist_deadline_s "
                f"({budget_ms / 1000:.0f} s) must be below "
                f"rabbitmq.consumer_timeout_ms ({self.rabbitmq.consumer_timeout_ms / 1000:.0f} s)"
            )
        return self


def cpu_set() -> frozenset[int]:
    """Ids of the CPUs this process may run on (its affinity mask: ``taskset``, cpusets)."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return frozenset(range(os.cpu_count() or 1))


def available_cpus(*, cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use, at least 1.

    The smaller of the CPUs it may run on (affinity, cpusets) and its cgroup v2 CPU quota
    (``docker run --cpus``, a Kubernetes CPU limit), rounded up.
    """
    cpus = len(cpu_set())
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return max(1, cpus)
    if quota != "max" and int(period) > 0:
        cpus = min(cpus, -(-int(quota) // int(period)))
    return max(1, cpus)
