"""``submit`` against the real RabbitMQ and Redis: message properties, progress hash, failures, --wait."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from analysis_service.cli.submit import (
    EXIT_FAILURES,
    EXIT_OK,
    EXIT_USAGE,
    Submission,
    build_requests,
    check_path,
    overall_line,
    redact_url,
    run,
)
from analysis_service.errors import FileMissing, FileUnreadable, PathOutsideMediaRoot
from analysis_service.settings import RabbitSettings, RedisSettings, Settings, WorkerSettings
from analysis_service.sinks.progress import ProgressStore
from service_shared.messages import AnalysisKind, AnalysisRequest
from tests.integration.broker_names import unique_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@dataclass
class Broker:
    """A uniquely named request exchange (and, when ``bound``, a queue bound like the worker's)."""

    settings: RabbitSettings
    channel: AbstractChannel
    queue: AbstractQueue | None


@pytest.fixture
def rabbit_settings(rabbit_url: str) -> RabbitSettings:
    return unique_settings(rabbit_url, request_routing_key="analysis.request", publish_timeout_s=5.0)


@pytest.fixture
async def channel(rabbit_url: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect_robust(rabbit_url)
    async with connection:
        yield await connection.channel()


async def declare(channel: AbstractChannel, settings: RabbitSettings, *, bound: bool) -> AbstractQueue | None:
    """The exchange, and a priority queue bound with the request routing key when ``bound``."""
    exchange = await channel.declare_exchange(
        settings.request_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    if not bound:
        return None
    queue = await channel.declare_queue(
        settings.request_queue, durable=True, arguments={"x-max-priority": settings.max_priority}
    )
    await queue.bind(exchange, routing_key=settings.request_routing_key)
    # Urgent requests too, so that every request submit publishes is read from one queue here
    # (the worker consumes them from a queue of their own).
    await queue.bind(exchange, routing_key=settings.urgent_routing_key)
    return queue


@pytest.fixture
async def broker(channel: AbstractChannel, rabbit_settings: RabbitSettings) -> AsyncIterator[Broker]:
    """Exchange + bound queue; both deleted afterwards."""
    queue = await declare(channel, rabbit_settings, bound=True)
    yield Broker(rabbit_settings, channel, queue)
    await channel.queue_delete(rabbit_settings.request_queue)
    await channel.exchange_delete(rabbit_settings.request_exchange)


@pytest.fixture
async def unbound_broker(channel: AbstractChannel, rabbit_settings: RabbitSettings) -> AsyncIterator[Broker]:
    """Exchange without any queue: every request is unroutable; deleted afterwards."""
    await declare(channel, rabbit_settings, bound=False)
    yield Broker(rabbit_settings, channel, None)
    await channel.exchange_delete(rabbit_settings.request_exchange)


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "album").mkdir(parents=True)
    for name in ("one.flac", "two.mp3"):
        (root / "album" / name).write_bytes(b"not really audio")
    return root


def make_settings(rabbit: RabbitSettings, redis: RedisSettings, media_root: Path) -> Settings:
    return Settings(rabbitmq=rabbit, redis=redis, worker=WorkerSettings(media_root=media_root))


@pytest.fixture
async def store(redis_settings: RedisSettings) -> AsyncIterator[ProgressStore]:
    progress = ProgressStore(redis_settings)
    yield progress
    await progress.close()


async def submit(
    paths: list[Path],
    settings: Settings,
    *,
    priority: int = 5,
    wait: bool = False,
    analyses: list[str] | None = None,
    timeout_s: float = 30.0,
    as_json: bool = False,
) -> int:
    """``run`` in a thread (it starts its own event loop)."""
    return await asyncio.to_thread(
        run,
        paths,
        settings=settings,
        priority=priority,
        wait=wait,
        analyses=analyses,
        timeout_s=timeout_s,
        as_json=as_json,
    )


def submitted_ids(stdout: str) -> dict[str, str]:
    """``request_id -> file`` from the lines the command printed."""
    lines = [line.split("\t") for line in stdout.splitlines() if "\t" in line]
    return {request_id: file for request_id, file in lines}


async def receive(queue: AbstractQueue, count: int, timeout_s: float = 5.0) -> list[AbstractIncomingMessage]:
    messages: list[AbstractIncomingMessage] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(messages) < count:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            messages.append(message)
        elif asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"only {len(messages)} of {count} messages arrived within {timeout_s} s")
        else:
            await asyncio.sleep(0.05)
    return messages


async def test_submit_publishes_persistent_prioritised_requests(
    broker: Broker,
    redis_settings: RedisSettings,
    store: ProgressStore,
    media_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings(broker.settings, redis_settings, media_root)
    paths = [media_root / "album" / "one.flac", media_root / "album" / "two.mp3"]
    status = await submit(paths, settings, priority=8, analyses=["bpm", "key"])
    assert status == EXIT_OK

    ids = submitted_ids(capsys.readouterr().out)
    assert sorted(ids.values()) == ["album/one.flac", "album/two.mp3"]
    assert broker.queue is not None
    messages = await receive(broker.queue, 2)
    correlation_ids = set()
    for message in messages:
        request = AnalysisRequest.model_validate_json(message.body)
        assert ids[request.request_id] == request.file
        assert request.priority == 8
        assert request.analyses == [AnalysisKind.BPM, AnalysisKind.KEY]
        assert message.priority == 8
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.message_id == request.request_id
        assert message.correlation_id == request.correlation_id
        assert message.content_type == "application/json"
        correlation_ids.add(request.correlation_id)

        progress = await store.get(request.request_id)
        assert progress is not None
        assert progress["status"] == "queued"
        assert progress["file"] == request.file
        assert progress["correlation_id"] == request.correlation_id
    assert len(correlation_ids) == 1
    assert None not in correlation_ids


async def test_a_folder_submits_each_audio_file(
    broker: Broker, redis_settings: RedisSettings, media_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (media_root / "album" / "cover.jpg").write_bytes(b"jpeg")
    settings = make_settings(broker.settings, redis_settings, media_root)
    assert await submit([media_root], settings) == EXIT_OK
    assert sorted(submitted_ids(capsys.readouterr().out).values()) == ["album/one.flac", "album/two.mp3"]
    assert broker.queue is not None
    assert len(await receive(broker.queue, 2)) == 2


async def test_unroutable_request_fails_with_a_hint(
    unbound_broker: Broker,
    redis_settings: RedisSettings,
    store: ProgressStore,
    media_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings(unbound_broker.settings, redis_settings, media_root)
    status = await submit([media_root / "album" / "one.flac"], settings)
    assert status == EXIT_FAILURES
    captured = capsys.readouterr()
    assert submitted_ids(captured.out) == {}
    err = " ".join(captured.err.split())
    assert "unroutable" in err
    assert "start the worker first" in err
    assert unbound_broker.settings.request_exchange in err


async def test_missing_exchange_fails_with_a_hint(
    rabbit_settings: RabbitSettings,
    redis_settings: RedisSettings,
    redis_url: str,
    media_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings(rabbit_settings, redis_settings, media_root)
    status = await submit([media_root / "album" / "one.flac"], settings)
    assert status == EXIT_FAILURES
    err = " ".join(capsys.readouterr().err.split())
    assert f"request exchange {rabbit_settings.request_exchange!r} does not exist" in err
    assert "start the worker first" in err


async def test_unpublished_requests_are_marked_failed(
    unbound_broker: Broker, redis_settings: RedisSettings, redis_url: str, media_root: Path
) -> None:
    from redis.asyncio import Redis

    settings = make_settings(unbound_broker.settings, redis_settings, media_root)
    assert await submit([media_root / "album" / "one.flac"], settings) == EXIT_FAILURES
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = [key async for key in client.scan_iter(match=f"{redis_settings.key_prefix}:progress:*")]
        assert len(keys) == 1
        fields = await client.hgetall(keys[0])
    finally:
        await client.aclose()
    assert fields["status"] == "failed"
    assert fields["error_code"] == "not_published"


async def test_unreachable_broker_fails(
    redis_settings: RedisSettings, media_root: Path, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    rabbit = RabbitSettings(url=f"amqp://guest:secret@127.0.0.1:{closed_port}/", publish_timeout_s=3.0)
    settings = make_settings(rabbit, redis_settings, media_root)
    assert await submit([media_root / "album" / "one.flac"], settings) == EXIT_FAILURES
    err = " ".join(capsys.readouterr().err.split())
    assert f"cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:{closed_port}/" in err
    assert "secret" not in err


async def test_redis_down_still_submits(
    broker: Broker, media_root: Path, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    redis = RedisSettings(url=f"redis://127.0.0.1:{closed_port}/0", socket_timeout_s=1.0)
    settings = make_settings(broker.settings, redis, media_root)
    assert await submit([media_root / "album" / "one.flac"], settings) == EXIT_OK
    captured = capsys.readouterr()
    assert len(submitted_ids(captured.out)) == 1
    assert "warning" in captured.err
    assert "progress will not be recorded" in " ".join(captured.err.split())
    assert broker.queue is not None
    assert len(await receive(broker.queue, 1)) == 1


async def test_bad_analysis_name_is_a_usage_error(
    rabbit_settings: RabbitSettings, redis_settings: RedisSettings, media_root: Path
) -> None:
    settings = make_settings(rabbit_settings, redis_settings, media_root)
    assert await submit([media_root], settings, analyses=["tempo"]) == EXIT_USAGE


async def fake_worker(queue: AbstractQueue, store: ProgressStore, *, fail: set[str]) -> None:
    """Take two requests; report running, then completed (or failed for files in ``fail``)."""
    for message in await receive(queue, 2, timeout_s=10.0):
        request = AnalysisRequest.model_validate_json(message.body)
        await store.update(request.request_id, status="running", percent=0, stage="decode")
        await asyncio.sleep(0.2)
        await store.update(request.request_id, status="running", percent=60, stage="features")
        await asyncio.sleep(0.2)
        if request.file in fail:
            await store.update(
                request.request_id,
                status="failed",
                percent=100,
                stage="done",
                error_code="file_not_found",
                error="no such file",
            )
        else:
            await store.update(
                request.request_id,
                status="completed",
                percent=100,
                stage="done",
                summary={
                    "bpm": "124.0",
                    "key": "A minor",
                    "camelot": "8A",
                    "mood": "energetic",
                    "duration_s": "8.0",
                },
            )


@pytest.mark.parametrize(("fail", "expected"), [(set(), EXIT_OK), ({"album/two.mp3"}, EXIT_FAILURES)])
async def test_wait_follows_progress_to_the_end(
    broker: Broker,
    redis_settings: RedisSettings,
    store: ProgressStore,
    media_root: Path,
    capsys: pytest.CaptureFixture[str],
    fail: set[str],
    expected: int,
) -> None:
    assert broker.queue is not None
    settings = make_settings(broker.settings, redis_settings, media_root)
    worker = asyncio.create_task(fake_worker(broker.queue, store, fail=fail))
    started = asyncio.get_running_loop().time()
    status = await submit([media_root / "album"], settings, wait=True, timeout_s=20.0)
    await worker
    assert status == expected
    assert asyncio.get_running_loop().time() - started < 10.0, "waited for the timeout instead of the end"
    out = capsys.readouterr().out
    assert "completed" in out
    assert ("file_not_found" in out) == bool(fail)
    [row] = [line for line in out.splitlines() if "one.flac" in line]
    assert "8A" in row  # the Camelot code
    assert "energetic" in row  # the mood


async def test_wait_times_out(
    broker: Broker, redis_settings: RedisSettings, media_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(broker.settings, redis_settings, media_root)
    status = await submit([media_root / "album" / "one.flac"], settings, wait=True, timeout_s=1.5)
    assert status == EXIT_FAILURES
    assert "timed out" in capsys.readouterr().out


async def test_wait_without_redis_times_out_with_a_warning(
    broker: Broker, media_root: Path, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    redis = RedisSettings(url=f"redis://127.0.0.1:{closed_port}/0", socket_timeout_s=0.5)
    settings = make_settings(broker.settings, redis, media_root)
    status = await submit([media_root / "album" / "one.flac"], settings, wait=True, timeout_s=1.5)
    assert status == EXIT_FAILURES
    captured = capsys.readouterr()
    assert "timed out" in captured.out
    assert "cannot read progress" in " ".join(captured.err.split())


def test_check_path_gives_the_path_relative_to_the_media_root(tmp_path: Path, media_root: Path) -> None:
    assert check_path(media_root / "album" / "one.flac", media_root) == "album/one.flac"
    link = tmp_path / "link"
    link.symlink_to(media_root)
    assert check_path(link / "album" / "one.flac", media_root) == "album/one.flac"


def test_check_path_rejects_what_the_worker_could_not_take(tmp_path: Path, media_root: Path) -> None:
    outside = tmp_path / "x.wav"
    outside.write_bytes(b"audio")
    with pytest.raises(PathOutsideMediaRoot):
        check_path(outside, media_root)
    escape = media_root / "album" / "escape.wav"  # inside by name, outside once resolved
    escape.symlink_to(outside)
    with pytest.raises(PathOutsideMediaRoot):
        check_path(escape, media_root)
    with pytest.raises(PathOutsideMediaRoot):
        check_path(media_root / ".." / "x.wav", media_root)
    with pytest.raises(FileMissing):
        check_path(media_root / "album" / "missing.flac", media_root)
    with pytest.raises(FileUnreadable):
        check_path(media_root / "album", media_root)


async def test_rejected_paths_are_reported_never_sent_and_fail_the_run(
    broker: Broker,
    redis_settings: RedisSettings,
    media_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    outside = tmp_path / "elsewhere.wav"
    outside.write_bytes(b"audio outside the root")
    (media_root / "album" / "one.flac").rename(media_root / "album" / "[red] one.flac")
    settings = make_settings(broker.settings, redis_settings, media_root)
    paths = [media_root / "album" / "[red] one.flac", outside, media_root / "album" / "gone.wav"]

    status = await submit(paths, settings)

    assert status == EXIT_FAILURES
    captured = capsys.readouterr()
    assert list(submitted_ids(captured.out).values()) == ["album/[red] one.flac"]
    err = " ".join(captured.err.split())
    assert f"rejected: {outside}: path_outside_media_root" in err
    assert "gone.wav: file_not_found" in err
    assert "2 path(s) rejected" in err
    assert broker.queue is not None
    [message] = await receive(broker.queue, 1)
    assert AnalysisRequest.model_validate_json(message.body).file == "album/[red] one.flac"
    await asyncio.sleep(0.3)
    assert await broker.queue.get(no_ack=True, fail=False) is None  # nothing else was sent


async def test_only_rejected_paths_send_nothing(
    broker: Broker,
    redis_settings: RedisSettings,
    media_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    outside = tmp_path / "elsewhere.wav"
    outside.write_bytes(b"audio outside the root")
    settings = make_settings(broker.settings, redis_settings, media_root)
    assert await submit([outside], settings, as_json=True) == EXIT_FAILURES
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["status"] == "rejected"
    assert record["error"]["code"] == "path_outside_media_root"
    assert broker.queue is not None
    await asyncio.sleep(0.3)
    assert await broker.queue.get(no_ack=True, fail=False) is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "amqp://guest:wrong-pw@127.0.0.1:5672/",
            "refused the login of user 'guest': wrong user name or password",
        ),
        ("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "refused to open virtual host 'no-such-vhost'"),
    ],
)
async def test_wrong_credentials_or_vhost_get_a_clear_message(
    rabbit_url: str,
    redis_settings: RedisSettings,
    media_root: Path,
    capsys: pytest.CaptureFixture[str],
    url: str,
    expected: str,
) -> None:
    rabbit = RabbitSettings(url=url, publish_timeout_s=5.0)
    settings = make_settings(rabbit, redis_settings, media_root)
    assert await submit([media_root / "album" / "one.flac"], settings) == EXIT_FAILURES
    err = " ".join(capsys.readouterr().err.split())
    assert expected in err
    assert "wrong-pw" not in err


async def test_json_output_with_wait(
    broker: Broker,
    redis_settings: RedisSettings,
    store: ProgressStore,
    media_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert broker.queue is not None
    settings = make_settings(broker.settings, redis_settings, media_root)
    worker = asyncio.create_task(fake_worker(broker.queue, store, fail={"album/two.mp3"}))
    status = await submit([media_root / "album"], settings, wait=True, timeout_s=20.0, as_json=True)
    await worker
    assert status == EXIT_FAILURES
    records = {r["file"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert records["album/one.flac"]["status"] == "completed"
    assert records["album/one.flac"]["result"] == {
        "bpm": "124.0",
        "key": "A minor",
        "camelot": "8A",
        "mood": "energetic",
        "duration_s": "8.0",
    }
    assert records["album/two.mp3"]["status"] == "failed"
    assert records["album/two.mp3"]["error"]["code"] == "file_not_found"


def test_overall_line_counts_and_estimates() -> None:
    requests = build_requests([f"f{i}.wav" for i in range(4)], priority=5, analyses=None, correlation_id="c")
    subs = [Submission(r) for r in requests]
    subs[0].status, subs[1].status, subs[2].status, subs[2].percent = "completed", "failed", "running", 50.0
    assert overall_line(subs, elapsed_s=25.0) == "2/4 done (1 failed) · 1 running · 1 queued · ETA 15s"


def test_redact_url() -> None:
    assert redact_url("amqp://guest:pw@host:5672/vh") == "amqp://guest:***@host:5672/vh"
    assert redact_url("amqp://host/") == "amqp://host/"
