"""ResultCache against a real Redis: round trip, TTL, misses on any configuration change."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from analysis_service.errors import SinkUnavailable
from analysis_service.settings import RedisSettings
from analysis_service.sinks.cache import ResultCache, versions_digest
from service_shared.messages import EngineOutput, KeyResult, TempoResult

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

VERSIONS = {"tempo": "1.0", "key": "1.1"}
ANALYSES = ["bpm", "key"]

OUTPUT = EngineOutput(
    duration_s=180.0,
    source_sample_rate=44100,
    source_channels=2,
    format="mp3",
    tempo=TempoResult(bpm=128.0, confidence=0.9),
    key=KeyResult(key="A minor", tonic="A", mode="minor", camelot="8A", confidence=0.7),
    analyzer_versions=VERSIONS,
    timings_s={"decode": 0.2},
)


@pytest.fixture
async def cache(redis_settings: RedisSettings) -> AsyncIterator[ResultCache]:
    result_cache = ResultCache(redis_settings)
    yield result_cache
    await result_cache.close()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    yield redis
    await redis.aclose()


def test_digest_is_order_independent_and_sensitive_to_every_input() -> None:
    base = versions_digest({"a": "1", "b": "2"}, ["bpm", "key"], None)
    assert len(base) == 16
    assert versions_digest({"b": "2", "a": "1"}, ["key", "bpm"], None) == base
    assert versions_digest({"a": "1", "b": "3"}, ["bpm", "key"], None) != base
    assert versions_digest({"a": "1", "b": "2"}, ["bpm"], None) != base
    assert versions_digest({"a": "1", "b": "2"}, ["bpm", "key"], True) != base
    assert versions_digest({"a": "1", "b": "2"}, ["bpm", "key"], False) != base
    assert versions_digest({"a": "1", "b": "2"}, ["bpm", "key"], None, (88.0, 175.0)) != base
    ranged = versions_digest({"a": "1", "b": "2"}, ["bpm", "key"], None, (78.0, 155.0))
    assert ranged != versions_digest({"a": "1", "b": "2"}, ["bpm", "key"], None, (88.0, 175.0))


def test_digest_without_a_bpm_range_is_the_one_written_before_the_option() -> None:
    # The key of a cached output from the release before ``bpm_range``: still found after it.
    assert versions_digest({"a": "1", "b": "2"}, ["bpm", "key"], None) == "8ecb206aae6e0537"


async def test_round_trip_with_ttl(cache: ResultCache, client: Redis, redis_settings: RedisSettings) -> None:
    assert await cache.get("h1", analyzer_versions=VERSIONS, analyses=ANALYSES, timeline=None) is None
    await cache.put("h1", OUTPUT, analyzer_versions=VERSIONS, analyses=ANALYSES, timeline=None)
    assert await cache.get("h1", analyzer_versions=VERSIONS, analyses=ANALYSES, timeline=None) == OUTPUT

    key = cache.key("h1", analyzer_versions=VERSIONS, analyses=ANALYSES, timeline=None)
    assert key.startswith(f"{redis_settings.key_prefix}:cache:h1:")
    assert 0 < await client.ttl(key) <= redis_settings.cache_ttl_s


async def test_any_configuration_change_is_a_miss(cache: ResultCache) -> None:
    await cache.put("h1", OUTPUT, analyzer_versions=VERSIONS, analyses=ANALYSES, timeline=None)
    newer = {**VERSIONS, "key": "1.2"}
    assert await cache.get("h1", analyzer_versions=newer, analyses=ANALYSES, timeline=None) is None
    assert await cache.get("h1", analyzer_versions=VERSIONS, analyses=["bpm"], timeline=None) is None
    assert await cache.get("h1", analyzer_versions=VERSIONS, analyses=ANALYSES, timeline=True) is None
    assert await cache.get("h2", analyzer_versions=VERSIONS, analyses=ANALYSES, timeline=None) is None


async def test_unreadable_entry_is_dropped_as_a_miss(cache: ResultCache, client: Redis) -> None:
    key = cache.key("h1", analyzer_versions=VERSIONS, analyses=ANALYSES, timeline=None)
    await client.set(key, '{"duration_s": "not a number"}')
    assert await cache.get("h1", analyzer_versions=VERSIONS, analyses=ANALYSES, timeline=None) is None
    assert await client.exists(key) == 0


async def test_shared_client_is_not_closed_by_the_cache(redis_settings: RedisSettings, client: Redis) -> None:
    shared = ResultCache(redis_settings, client=client)
    await shared.put("h1", OUTPUT, analyzer_versions=VERSIONS, analyses=ANALYSES, timeline=None)
    await shared.close()
    assert await client.ping()


async def test_redis_down_is_sink_unavailable(closed_port: int) -> None:
    cache = ResultCache(RedisSettings(url=f"redis://127.0.0.1:{closed_port}/0", socket_timeout_s=0.5))
    try:
        with pytest.raises(SinkUnavailable, match="Redis"):
            await cache.get("h1", analyzer_versions=VERSIONS, analyses=ANALYSES, timeline=None)
        with pytest.raises(SinkUnavailable):
            await cache.put("h1", OUTPUT, analyzer_versions=VERSIONS, analyses=ANALYSES, timeline=None)
    finally:
        await cache.close()
