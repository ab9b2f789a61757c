"""``analysis-service submit``: queue analysis requests for the worker, and optionally follow them.

Each path is checked first: inside the worker's media root (symlinks resolved), an existing regular
file, readable. A rejected path is reported, never sent, and makes the exit status 1.

One :class:`~service_shared.messages.AnalysisRequest` per accepted file goes to the request exchange with
publisher confirms and ``mandatory`` set, so a request that no queue would take fails loudly
instead of vanishing. Before publishing, each request's progress hash is set to ``queued``
(best effort: without Redis the requests are still sent). With ``--wait`` the command follows
the requests over their Redis pub/sub channels, polling the progress hashes every second as a
fallback, shows one overall line (done, failed, running, ETA) and as many per-request bars as fit the
terminal, and prints a table with BPM, key, Camelot code and mood. ``--json`` prints one JSON object
per request instead (when published, or with ``--wait`` when it finishes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import aio_pika
import aio_pika.exceptions
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from analysis_service.cli.discover import expand_paths
from analysis_service.cli.settings_view import redact_url as redact_url
from analysis_service.errors import (
    AnalysisServiceError,
    FileMissing,
    FileUnreadable,
    PathOutsideMediaRoot,
    SinkUnavailable,
    SubmitError,
    TopologyMissing,
)
from analysis_service.settings import RabbitSettings, Settings
from analysis_service.sinks._util import REDIS_TRANSIENT_ERRORS, redis_client
from analysis_service.sinks.progress import ProgressStore
from analysis_service.worker.topology import request_message, routing_key_for
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
TERMINAL_STATUSES: Final = frozenset({"completed", "failed", "cancelled"})
#: ``app_id`` of the published messages.
APP_ID: Final = "analysis-service-submit"

#: Progress-hash fields of a completed request shown in the table and the JSON output.
SUMMARY_FIELDS: Final = ("bpm", "key", "camelot", "mood", "duration_s")
#: Seconds between two plain progress lines (stderr not a terminal).
PLAIN_INTERVAL_S: Final = 10.0

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
    summary: dict[str, str] = field(default_factory=dict)  # bpm, key, camelot, mood, when known
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
        self.summary.update({name: str(update[name]) for name in SUMMARY_FIELDS if update.get(name)})

    def to_json(self) -> str:
        """The request's state as one JSON object (``--json``)."""
        status = "timed_out" if self.timed_out else self.status
        record: dict[str, Any] = {
            "request_id": self.request_id,
            "file": self.request.file,
            "correlation_id": self.request.correlation_id,
            "status": status,
        }
        if self.status != "queued" or self.timed_out:
            record["percent"] = self.percent
        if self.summary:
            record["result"] = dict(self.summary)
        if self.error_code or self.error:
            record["error"] = {"code": self.error_code, "message": self.error}
        return json.dumps(record, ensure_ascii=False)


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


@dataclass(frozen=True)
class Rejected:
    """A path that was not submitted, and why."""

    path: Path
    code: str
    message: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "file": str(self.path),
                "status": "rejected",
                "error": {"code": self.code, "message": self.message},
            },
            ensure_ascii=False,
        )


def check_path(path: Path, media_root: Path) -> str:
    """The request's ``file`` for ``path``: its path relative to ``media_root``, once checked.

    The file must lie inside the media root once symlinks are resolved (as the worker resolves it),
    exist as a regular file and be readable. The relative path keeps the names as given when they
    lie inside the root literally (a root reached through a symlink still matches).

    Raises
    ------
    PathOutsideMediaRoot
        The path, symlinks resolved, is not inside the media root.
    FileMissing
        Nothing exists at the path.
    FileUnreadable
        The path is not a regular file or cannot be read.
    """
    root = media_root.resolve()
    resolved = path.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise PathOutsideMediaRoot(
            f"outside the media root {media_root} (ANALYSIS_WORKER__MEDIA_ROOT); not submitted",
            path=str(path),
        )
    literal, literal_root = Path(os.path.abspath(path)), Path(os.path.abspath(media_root))
    if literal != literal_root and literal.is_relative_to(literal_root):
        relative = literal.relative_to(literal_root)
    else:
        relative = resolved.relative_to(root)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileMissing("no such file", path=str(path)) from None
    except OSError as exc:
        raise FileUnreadable(f"cannot be read: {exc.strerror or exc}", path=str(path)) from exc
    if not stat.S_ISREG(mode):
        raise FileUnreadable("is not a regular file", path=str(path))
    if not os.access(path, os.R_OK):
        raise FileUnreadable("is not readable (permission denied)", path=str(path))
    return relative.as_posix()


def check_paths(files: Sequence[Path], media_root: Path) -> tuple[list[tuple[Path, str]], list[Rejected]]:
    """Split ``files`` into accepted ``(path, request file)`` pairs and rejected paths."""
    accepted: list[tuple[Path, str]] = []
    rejected: list[Rejected] = []
    for path in files:
        try:
            accepted.append((path, check_path(path, media_root)))
        except AnalysisServiceError as exc:
            rejected.append(Rejected(path, exc.code, exc.message))
    return accepted, rejected


def build_requests(
    files: Sequence[str],
    *,
    priority: int,
    analyses: list[AnalysisKind] | None,
    correlation_id: str,
) -> list[AnalysisRequest]:
    """One request per (checked, media-root relative) file, each with a fresh ``uuid4`` hex id."""
    extra: dict[str, Any] = {} if analyses is None else {"analyses": analyses}
    return [
        AnalysisRequest(
            request_id=uuid.uuid4().hex,
            file=file,
            priority=priority,
            correlation_id=correlation_id,
            **extra,
        )
        for file in files
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
    exchange_name = settings.request_exchange
    try:
        connection = await aio_pika.connect_robust(settings.url, timeout=settings.publish_timeout_s)
    except aio_pika.exceptions.ProbableAuthenticationError as exc:
        user = urlsplit(settings.url).username or "guest"
        raise SubmitError(
            f"RabbitMQ at {url} refused the login of user {user!r}: wrong user name or password "
            f"(ANALYSIS_RABBITMQ__URL); the broker said: {_describe(exc)}"
        ) from exc
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
        if "Connection.Close" in str(exc):  # the broker closed the connection while opening the vhost
            raise SubmitError(
                f"RabbitMQ at {url} refused to open virtual host {_vhost(settings.url)!r}: it does not exist "
                "or the user may not access it (ANALYSIS_RABBITMQ__URL)"
            ) from exc
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
            routing_key = routing_key_for(request.priority, settings)
            try:
                await exchange.publish(
                    request_message(request, app_id=APP_ID),
                    routing_key,
                    mandatory=True,
                    timeout=settings.publish_timeout_s,
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


def _vhost(url: str) -> str:
    """The virtual host a URL names (``/`` when it names none)."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


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

    async def wait(self, timeout_s: float, *, on_done: Callable[[Submission], object] | None = None) -> None:
        """Show progress until every submission is done or ``timeout_s`` passed (then mark timed out).

        ``on_done`` is called once per submission as it reaches a final status (and for the ones
        still unfinished at the timeout, marked timed out).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        reported: set[str] = set()

        def report_done() -> None:
            for s in self._submissions:
                if s.done and s.request_id not in reported:
                    reported.add(s.request_id)
                    if on_done is not None:
                        on_done(s)

        with ProgressView(self._submissions, self._console) as view:
            await self.poll()
            next_poll = loop.time() + POLL_INTERVAL_S
            while True:
                view.refresh()
                report_done()
                now = loop.time()
                if all(s.done for s in self._submissions) or now >= deadline:
                    break
                await self._receive(min(next_poll, deadline) - now)
                if loop.time() >= next_poll:
                    await self.poll()
                    next_poll = loop.time() + POLL_INTERVAL_S
        await self.poll(include_done=True)  # the last word, and the summary (bpm, key) of completed ones
        report_done()
        for s in self._submissions:
            if not s.done:
                s.timed_out = True
                if on_done is not None:
                    on_done(s)

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

    def _warn(self, kind: str, text: str) -> None:
        """Print a warning, only the first of each ``kind`` (one outage, one line)."""
        if kind not in self._warned:
            self._warned.add(kind)
            self._console.print(f"[yellow]warning:[/yellow] {escape(text)}")


def overall_line(submissions: Sequence[Submission], elapsed_s: float) -> str:
    """``120/400 done (3 failed) · 2 running · 278 queued · ETA 12m03s``."""
    total = len(submissions)
    done = sum(s.done for s in submissions)
    failed = sum(s.status == "failed" for s in submissions)
    running = [s for s in submissions if s.status == "running"]
    queued = total - done - len(running)
    text = f"{done}/{total} done" + (f" ({failed} failed)" if failed else "")
    text += f" · {len(running)} running · {queued} queued"
    progress = done + sum(min(s.percent, 100.0) / 100 for s in running)
    if 0 < progress < total and elapsed_s > 1:
        text += f" · ETA {_format_duration(elapsed_s * (total - progress) / progress)}"
    return text


def _format_duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class ProgressView:
    """The overall line and, on a terminal, bars for as many running requests as fit its height.

    When stderr is not a terminal, the overall line is printed every :data:`PLAIN_INTERVAL_S`.
    """

    def __init__(self, submissions: Sequence[Submission], console: Console) -> None:
        self._submissions = submissions
        self._console = console
        self._started = time.monotonic()
        self._last_plain = 0.0
        self._bar: Progress | None = None
        self._overall: TaskID | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> ProgressView:
        if self._console.is_terminal:
            self._bar = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(bar_width=24),
                TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("{task.fields[info]}", markup=False),
                console=self._console,
                transient=True,
                refresh_per_second=4,
            )
            self._bar.start()
            self._overall = self._bar.add_task("submit", total=max(1, len(self._submissions)), info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self.refresh()
            self._bar.stop()
            self._console.print(Text(f"submit: {self._line()}"), soft_wrap=True)

    def _line(self) -> str:
        return overall_line(self._submissions, time.monotonic() - self._started)

    def rows(self) -> int:
        """Request bars that fit: the terminal's height less the overall line and some margin."""
        return max(0, self._console.size.height - 4)

    def refresh(self) -> None:
        if self._bar is None:
            now = time.monotonic()
            if now - self._last_plain >= PLAIN_INTERVAL_S:
                self._last_plain = now
                self._console.file.write(f"submit: {self._line()}\n")
                self._console.file.flush()
            return
        assert self._overall is not None
        done = sum(s.done for s in self._submissions)
        self._bar.update(self._overall, completed=done, info=self._line())
        running = [s for s in self._submissions if s.status == "running"][: self.rows()]
        shown = {s.request_id for s in running}
        for request_id in [r for r in self._tasks if r not in shown]:
            self._bar.remove_task(self._tasks.pop(request_id))
        for s in running:
            info = s.stage
            if s.request_id not in self._tasks:
                self._tasks[s.request_id] = self._bar.add_task(
                    _short(s.request.file), total=100, completed=round(s.percent), info=info
                )
            else:
                self._bar.update(self._tasks[s.request_id], completed=s.percent, info=info)


def _short(name: str, chars: int = 40) -> str:
    return name if len(name) <= chars else "…" + name[-(chars - 1) :]


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


TABLE_COLUMNS: Final = ("file", "request id", "status", "bpm", "key", "camelot", "mood", "error")


def render_table(submissions: Sequence[Submission], console: Console) -> None:
    """Print file, status, BPM, key, Camelot code, mood and error of every submission.

    Cells are plain text (a file named ``[red] x.wav`` shows as it is); on a terminal a rich table
    sized to it, otherwise space-padded columns without box drawing.
    """
    rows: list[list[str]] = []
    for s in submissions:
        status = f"timed out ({s.status}, {s.percent:g}%)" if s.timed_out else s.status
        error = f"{s.error_code}: {s.error}" if s.error_code else (s.error or "")
        rows.append(
            [
                s.request.file,
                s.request_id,
                status,
                *(s.summary.get(name, "") for name in ("bpm", "key", "camelot", "mood")),
                error,
            ]
        )
    if console.is_terminal:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for column in TABLE_COLUMNS:
            table.add_column(column, overflow="fold")
        colours = {"completed": "green", "failed": "red"}
        for row in rows:
            table.add_row(
                *(Text(c, style=colours.get(c, "yellow") if i == 2 else "") for i, c in enumerate(row))
            )
        console.print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(TABLE_COLUMNS)]
    for line in [list(TABLE_COLUMNS), *rows]:
        console.file.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n")
    console.file.flush()


async def submit(
    files: Sequence[str],
    *,
    settings: Settings,
    priority: int,
    wait: bool,
    analyses: list[AnalysisKind] | None,
    timeout_s: float,
    out: Console,
    err: Console,
    as_json: bool = False,
) -> int:
    """Mark queued, publish, print the ids and (with ``wait``) follow; returns the exit status.

    ``files`` are request files already checked by :func:`check_paths` (relative to the media root).
    """
    requests = build_requests(files, priority=priority, analyses=analyses, correlation_id=uuid.uuid4().hex)
    submissions = [Submission(request) for request in requests]
    by_id = {s.request_id: s for s in submissions}
    client = redis_client(settings.redis)
    store = ProgressStore(settings.redis, client=client)
    follower = Follower(store, client, submissions, err) if wait else None

    def write(line: str) -> None:
        out.file.write(line + "\n")
        out.file.flush()

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
        if not wait:  # what went out, for scripts: "id<TAB>file" lines or JSON objects
            for request in published:
                write(
                    by_id[request.request_id].to_json()
                    if as_json
                    else f"{request.request_id}\t{request.file}"
                )
        if failure is not None:
            err.print(f"[red]error:[/red] {escape(str(failure))}", soft_wrap=True)
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
            if wait and as_json:
                for s in submissions:
                    write(s.to_json())
            return EXIT_FAILURES
        err.print(
            f"submitted {len(requests)} request(s), correlation id {requests[0].correlation_id}",
            highlight=False,
        )
        if follower is None:
            return EXIT_OK
        await follower.wait(timeout_s, on_done=(lambda s: write(s.to_json())) if as_json else None)
        if not as_json:
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
    as_json: bool = False,
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
    as_json : bool
        Print one JSON object per request (and per rejected path) on stdout instead of text.

    Returns
    -------
    int
        0 when every path was accepted and published (and, with ``wait``, completed); 1 when a path
        was rejected, a publish failed or, with ``wait``, a request failed or timed out; 2 on bad
        arguments; 130 on Ctrl-C.
    """
    err = Console(stderr=True, highlight=False)
    out = Console(highlight=False)
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
    accepted, rejected = check_paths(files, settings.worker.media_root)
    for r in rejected:
        if as_json:
            out.file.write(r.to_json() + "\n")
        err.print(Text.assemble(("rejected: ", "red"), f"{r.path}: {r.code}: {r.message}"), soft_wrap=True)
    out.file.flush()
    if not accepted:
        err.print(f"nothing submitted: all {len(rejected)} path(s) were rejected")
        return EXIT_FAILURES
    try:
        status = asyncio.run(
            submit(
                [file for _, file in accepted],
                settings=settings,
                priority=priority,
                wait=wait,
                analyses=kinds,
                timeout_s=timeout_s,
                out=out,
                err=err,
                as_json=as_json,
            )
        )
    except KeyboardInterrupt:
        err.print("interrupted: requests already published stay queued")
        return EXIT_INTERRUPTED
    if rejected:
        err.print(f"{len(rejected)} path(s) rejected (not submitted)")
        return max(status, EXIT_FAILURES)
    return status
