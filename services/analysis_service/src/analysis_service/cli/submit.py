"""``analysis-service submit``: queue analysis requests for the worker, and optionally follow them.

One :class:`~service_shared.messages.AnalysisRequest` per file goes to the request exchange with
publisher confirms and ``mandatory`` set, so a request that no queue would take fails loudly
instead of vanishing. Before publishing, each request's progress hash is set to ``queued``
(best effort: without Redis the requests are still sent). With ``--wait`` the command follows
the requests over their Redis pub/sub channels, polling the progress hashes every second as a
fallback, and prints a summary table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aio_pika
import aio_pika.exceptions
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from analysis_service.cli.discover import expand_paths
from analysis_service.cli.settings_view import redact_url as redact_url
from analysis_service.errors import SinkUnavailable, SubmitError, TopologyMissing
from analysis_service.settings import RabbitSettings, Settings
from analysis_service.sinks._util import REDIS_TRANSIENT_ERRORS, redis_client
from analysis_service.sinks.progress import ProgressStore
from service_shared.messages import AnalysisKind, AnalysisRequest

#: Exit statuses (the same as ``analysis_service.cli.main``'s).
EXIT_OK: Final = 0
EXIT_FAILURES: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

#: Seconds between polls of the progress hashes while waiting.
POLL_INTERVAL_S: Final = 1.0
#: Progress hashes read concurrently per poll.
POLL_BATCH: Final = 32
#: Statuses after which a request changes no more.
TERMINAL_STATUSES: Final = frozenset({"completed", "failed"})
#: ``app_id`` of the published messages.
APP_ID: Final = "analysis-service-submit"

START_WORKER_HINT: Final = "the worker has not declared the topology yet: start the worker first"


@dataclass
class Submission:
    """One request and what is known of its progress."""

    request: AnalysisRequest
    status: str = "queued"
    percent: float = 0.0
    stage: str = "queued"
    updated_at: datetime | None = None
    error_code: str | None = None
    error: str | None = None
    summary: dict[str, str] = field(default_factory=dict)  # bpm / key, when the hash carries them
    timed_out: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def apply(self, update: dict[str, Any]) -> None:
        """Take a progress hash or pub/sub payload, unless it is older than what is known."""
        updated_at = _parse_time(update.get("updated_at"))
        if updated_at is not None and self.updated_at is not None and updated_at < self.updated_at:
            return  # a pub/sub message overtaken by a poll of the hash
        self.updated_at = updated_at or self.updated_at
        self.status = str(update.get("status", self.status))
        self.stage = str(update.get("stage", self.stage))
        # A malformed percent leaves the last good one; status and stage still apply.
        with contextlib.suppress(TypeError, ValueError):
            self.percent = float(update.get("percent", self.percent))
        self.error_code = update.get("error_code")
        self.error = update.get("error")
        self.summary.update({name: str(update[name]) for name in ("bpm", "key") if update.get(name)})


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def request_file(path: Path, media_root: Path) -> str:
    """The ``file`` field for ``path``: relative to ``media_root`` when inside it, else as given.

    Both the literal absolute path and the one with symlinks resolved are tried, so a media root
    reached through a symlink still matches. The worker itself rejects paths outside its root.
    """
    for candidate, root in (
        (Path(os.path.abspath(path)), Path(os.path.abspath(media_root))),
        (path.resolve(), media_root.resolve()),
    ):
        if candidate != root and candidate.is_relative_to(root):
            return candidate.relative_to(root).as_posix()
    return str(path)


def build_requests(
    files: Sequence[Path],
    *,
    media_root: Path,
    priority: int,
    analyses: list[AnalysisKind] | None,
    correlation_id: str,
) -> list[AnalysisRequest]:
    """One request per file, each with a fresh ``uuid4`` hex id and the shared ``correlation_id``."""
    extra: dict[str, Any] = {} if analyses is None else {"analyses": analyses}
    return [
        AnalysisRequest(
            request_id=uuid.uuid4().hex,
            file=request_file(path, media_root),
            priority=priority,
            correlation_id=correlation_id,
            **extra,
        )
        for path in files
    ]


def parse_analyses(names: list[str] | None) -> list[AnalysisKind] | None:
    """Analysis kinds from their names (``None``: all).

    Raises
    ------
    ValueError
        On an unknown name; the message lists the valid ones.
    """
    if names is None:
        return None
    kinds: list[AnalysisKind] = []
    for name in names:
        try:
            kinds.append(AnalysisKind(name.strip().lower()))
        except ValueError:
            valid = ", ".join(kind.value for kind in AnalysisKind)
            raise ValueError(f"unknown analysis {name!r}; choose from {valid}") from None
    if not kinds:
        raise ValueError("--analyses names no analysis")
    return kinds


def _message(request: AnalysisRequest) -> aio_pika.Message:
    return aio_pika.Message(
        body=request.model_dump_json().encode(),
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=request.priority,
        message_id=request.request_id,
        correlation_id=request.correlation_id,
        timestamp=datetime.now(UTC),
        app_id=APP_ID,
    )


async def publish_requests(
    settings: RabbitSettings,
    requests: Sequence[AnalysisRequest],
    *,
    on_published: Callable[[AnalysisRequest], object] | None = None,
) -> None:
    """Publish ``requests`` in order, each confirmed by the broker before the next.

    ``on_published`` is called with each request once the broker confirmed it, so that after a
    failure the caller knows which requests went out.

    Raises
    ------
    TopologyMissing
        When the request exchange does not exist or no queue is bound for the routing key.
    SubmitError
        When the broker cannot be reached, refuses a message or does not confirm it in
        ``publish_timeout_s``. Requests before the failing one were published.
    """
    url = redact_url(settings.url)
    exchange_name, routing_key = settings.request_exchange, settings.request_routing_key
    try:
        connection = await aio_pika.connect_robust(settings.url, timeout=settings.publish_timeout_s)
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
        raise SubmitError(f"cannot connect to RabbitMQ at {url}: {_describe(exc)}") from exc
    async with connection:
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = await channel.get_exchange(exchange_name, ensure=True)
        except aio_pika.exceptions.ChannelNotFoundEntity as exc:
            raise TopologyMissing(
                f"request exchange {exchange_name!r} does not exist on {url}: {START_WORKER_HINT}"
            ) from exc
        except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
            raise SubmitError(f"cannot open a channel on RabbitMQ at {url}: {_describe(exc)}") from exc
        for request in requests:
            try:
                await exchange.publish(
                    _message(request), routing_key, mandatory=True, timeout=settings.publish_timeout_s
                )
            except aio_pika.exceptions.PublishError as exc:
                raise TopologyMissing(
                    f"request {request.request_id} was returned unroutable: no queue is bound to exchange "
                    f"{exchange_name!r} with routing key {routing_key!r} on {url}; {START_WORKER_HINT}"
                ) from exc
            except TimeoutError as exc:
                raise SubmitError(
                    f"RabbitMQ at {url} did not confirm request {request.request_id} within "
                    f"{settings.publish_timeout_s:g} s"
                ) from exc
            except (OSError, RuntimeError, aio_pika.exceptions.AMQPError) as exc:
                # DeliveryError (a nack), a closed channel or connection, ...
                raise SubmitError(
                    f"publishing request {request.request_id} to exchange {exchange_name!r} on {url} "
                    f"failed: {_describe(exc)}"
                ) from exc
            if on_published is not None:
                on_published(request)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Follower:
    """Follows submissions over their Redis pub/sub channels, with a polling fallback.

    Parameters
    ----------
    store : ProgressStore
        Reads the progress hashes and names the channels.
    client : redis.asyncio.Redis
        The client behind ``store``, used for the subscription.
    submissions : sequence of Submission
        What to follow; updated in place.
    console : rich.console.Console
        Where warnings and the progress bars go.
    """

    def __init__(
        self, store: ProgressStore, client: Redis, submissions: Sequence[Submission], console: Console
    ) -> None:
        self._store = store
        self._client = client
        self._by_channel = {store.key(s.request_id): s for s in submissions}
        self._submissions = list(submissions)
        self._console = console
        self._pubsub: PubSub | None = None
        self._warned: set[str] = set()

    async def subscribe(self) -> None:
        """Subscribe to every request's channel; without Redis, warn and rely on polling."""
        pubsub = self._client.pubsub()
        try:
            await pubsub.subscribe(*self._by_channel)
        except REDIS_TRANSIENT_ERRORS as exc:
            self._warn("pubsub", f"cannot subscribe to progress updates ({_describe(exc)}); polling instead")
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            return
        self._pubsub = pubsub

    async def close(self) -> None:
        """Drop the subscription."""
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            except REDIS_TRANSIENT_ERRORS as exc:
                self._warn("pubsub", f"closing the progress subscription failed: {_describe(exc)}")

    async def wait(self, timeout_s: float) -> None:
        """Show progress until every submission is done or ``timeout_s`` passed (then mark timed out)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        columns = (
            TextColumn("{task.description}", style="bold"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[status]}"),
            TextColumn("[dim]{task.fields[stage]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self._console) as bar:
            tasks = {
                s.request_id: bar.add_task(escape(s.request.file), total=100, status=s.status, stage=s.stage)
                for s in self._submissions
            }
            await self.poll()
            next_poll = loop.time() + POLL_INTERVAL_S
            while True:
                self._refresh(bar, tasks)
                now = loop.time()
                if all(s.done for s in self._submissions) or now >= deadline:
                    break
                await self._receive(min(next_poll, deadline) - now)
                if loop.time() >= next_poll:
                    await self.poll()
                    next_poll = loop.time() + POLL_INTERVAL_S
        await self.poll(include_done=True)  # the last word, and the summary (bpm, key) of completed ones
        for s in self._submissions:
            s.timed_out = not s.done

    async def poll(self, *, include_done: bool = False) -> None:
        """Read the progress hashes of the (unfinished) submissions, a batch at a time.

        On a Redis error, warn (once) and leave the rest for the next poll.
        """
        due = [s for s in self._submissions if include_done or not s.done]
        for start in range(0, len(due), POLL_BATCH):
            batch = due[start : start + POLL_BATCH]
            try:
                found = await asyncio.gather(*(self._store.get(s.request_id) for s in batch))
            except SinkUnavailable as exc:
                self._warn("poll", f"cannot read progress (retrying every {POLL_INTERVAL_S:g} s): {exc}")
                return
            for submission, progress in zip(batch, found, strict=True):
                if progress is not None:
                    submission.apply(progress)

    async def _receive(self, wait_s: float) -> None:
        """Apply the pub/sub messages arriving within ``wait_s`` seconds (or just sleep without)."""
        if self._pubsub is None:
            await asyncio.sleep(max(wait_s, 0.0))
            return
        try:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=max(wait_s, 0.0))
        except REDIS_TRANSIENT_ERRORS as exc:
            self._warn("pubsub", f"progress subscription lost ({_describe(exc)}); polling instead")
            await self.close()
            return
        if message is None:
            return
        submission = self._by_channel.get(str(message.get("channel")))
        if submission is None:
            return
        try:
            payload = json.loads(message["data"])
        except (TypeError, ValueError) as exc:
            self._warn(
                "malformed", f"ignoring a malformed progress message for {submission.request_id}: {exc}"
            )
            return
        if isinstance(payload, dict):
            submission.apply(payload)

    def _refresh(self, bar: Progress, tasks: dict[str, TaskID]) -> None:
        for s in self._submissions:
            colour = {"completed": "green", "failed": "red", "running": "cyan"}.get(s.status, "yellow")
            bar.update(
                tasks[s.request_id],
                completed=100.0 if s.status == "completed" else s.percent,
                status=f"[{colour}]{s.status}[/{colour}]",
                stage=escape(s.stage),
            )

    def _warn(self, kind: str, text: str) -> None:
        """Print a warning, only the first of each ``kind`` (one outage, one line)."""
        if kind not in self._warned:
            self._warned.add(kind)
            self._console.print(f"[yellow]warning:[/yellow] {escape(text)}")


async def mark_queued(store: ProgressStore, submissions: Sequence[Submission], console: Console) -> bool:
    """Set every progress hash to ``queued``; on the first Redis error warn and stop (False)."""
    for s in submissions:
        try:
            await store.update(
                s.request_id,
                status="queued",
                percent=0.0,
                stage="queued",
                correlation_id=s.request.correlation_id,
                file=s.request.file,
            )
        except SinkUnavailable as exc:
            console.print(
                f"[yellow]warning:[/yellow] progress will not be recorded as queued: {escape(str(exc))}"
            )
            return False
    return True


async def mark_unpublished(store: ProgressStore, submissions: Sequence[Submission], reason: str) -> None:
    """Mark requests that never reached the broker as failed, so their ``queued`` hash does not linger."""
    for s in submissions:
        await store.update(
            s.request_id,
            status="failed",
            percent=0.0,
            stage="submit",
            error_code="not_published",
            error=reason,
        )
        s.status, s.error_code, s.error = "failed", "not_published", reason


def render_table(submissions: Sequence[Submission], console: Console) -> None:
    """Print file, status, bpm, key and error of every submission."""
    table = Table()
    for column in ("file", "request id", "status", "bpm", "key", "error"):
        table.add_column(column, overflow="fold")
    for s in submissions:
        if s.timed_out:
            status = f"[yellow]timed out[/yellow] ({s.status}, {s.percent:g}%)"
        else:
            colour = "green" if s.status == "completed" else "red" if s.status == "failed" else "yellow"
            status = f"[{colour}]{s.status}[/{colour}]"
        error = f"{s.error_code}: {s.error}" if s.error_code else (s.error or "")
        table.add_row(
            escape(s.request.file),
            s.request_id,
            status,
            escape(s.summary.get("bpm", "")),
            escape(s.summary.get("key", "")),
            escape(error),
        )
    console.print(table)


async def submit(
    files: Sequence[Path],
    *,
    settings: Settings,
    priority: int,
    wait: bool,
    analyses: list[AnalysisKind] | None,
    timeout_s: float,
    out: Console,
    err: Console,
) -> int:
    """Mark queued, publish, print the ids and (with ``wait``) follow; returns the exit status."""
    requests = build_requests(
        files,
        media_root=settings.worker.media_root,
        priority=priority,
        analyses=analyses,
        correlation_id=uuid.uuid4().hex,
    )
    submissions = [Submission(request) for request in requests]
    client = redis_client(settings.redis)
    store = ProgressStore(settings.redis, client=client)
    follower = Follower(store, client, submissions, err) if wait else None
    try:
        redis_ok = await mark_queued(store, submissions, err)
        if follower is not None and redis_ok:
            await follower.subscribe()  # before publishing: no update can be missed
        published: list[AnalysisRequest] = []
        failure: SubmitError | None = None
        try:
            await publish_requests(settings.rabbitmq, requests, on_published=published.append)
        except SubmitError as exc:
            failure = exc
        for request in published:  # plain "id<TAB>file" lines, for scripts
            out.file.write(f"{request.request_id}\t{request.file}\n")
        out.file.flush()
        if failure is not None:
            err.print(f"[red]error:[/red] {escape(str(failure))}")
            if len(published) < len(requests):
                err.print(
                    f"{len(requests) - len(published)} of {len(requests)} request(s) were not submitted"
                )
            if redis_ok:
                try:
                    await mark_unpublished(store, submissions[len(published) :], str(failure))
                except SinkUnavailable as exc:
                    err.print(
                        f"[yellow]warning:[/yellow] could not mark the requests failed: {escape(str(exc))}"
                    )
            return EXIT_FAILURES
        err.print(
            f"submitted {len(requests)} request(s), correlation id {requests[0].correlation_id}",
            highlight=False,
        )
        if follower is None:
            return EXIT_OK
        await follower.wait(timeout_s)
        render_table(submissions, out)
        return EXIT_OK if all(s.status == "completed" for s in submissions) else EXIT_FAILURES
    finally:
        if follower is not None:
            await follower.close()
        await store.close()
        await client.aclose()


def run(
    paths: list[Path],
    *,
    settings: Settings,
    priority: int,
    wait: bool,
    analyses: list[str] | None,
    timeout_s: float,
) -> int:
    """Entry of the command; returns the exit status.

    Parameters
    ----------
    paths : list of Path
        Audio files, or folders searched recursively for audio files.
    settings : Settings
        RabbitMQ, Redis and the media root.
    priority : int
        0 (lowest) to 9 (highest): the request's and the AMQP message's priority.
    wait : bool
        Follow the requests until they finish or ``timeout_s`` passes.
    analyses : list of str, optional
        Analyses to run (``bpm``, ``key``, ``mood``); ``None``: all.
    timeout_s : float
        How long ``wait`` waits, in seconds.

    Returns
    -------
    int
        0 when everything was published (and, with ``wait``, completed); 1 when a publish failed
        or, with ``wait``, a request failed or timed out; 2 on bad arguments; 130 on Ctrl-C.
    """
    err = Console(stderr=True)
    out = Console(width=None if sys.stdout.isatty() else 200)
    try:
        kinds = parse_analyses(analyses)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        return EXIT_USAGE
    if not 0 <= priority <= 9:
        err.print(f"[red]error:[/red] priority must be 0-9, not {priority}")
        return EXIT_USAGE
    files = list(expand_paths(paths))
    if not files:
        err.print("[red]error:[/red] no audio files found in: " + escape(", ".join(map(str, paths))))
        return EXIT_USAGE
    try:
        return asyncio.run(
            submit(
                files,
                settings=settings,
                priority=priority,
                wait=wait,
                analyses=kinds,
                timeout_s=timeout_s,
                out=out,
                err=err,
            )
        )
    except KeyboardInterrupt:
        err.print("interrupted: requests already published stay queued")
        return EXIT_INTERRUPTED
