"""Hostile and broken input against one running worker and the real services: every kind of bad
request ends in its own error code, stored in PostgreSQL and announced on the results exchange, is
dead-lettered, nothing hangs, the messages stay bounded, and the worker goes on serving good requests.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import numpy as np
import pytest
import soundfile as sf

from analysis_service.audio.synth import demo_song
from analysis_service.settings import EngineSettings, Neo4jSettings, RedisSettings, Settings
from analysis_service.worker.pipeline import rejected_id
from service_shared.messages import AnalysisResultMessage, ResultStatus
from tests.integration.worker_harness import Broker, make_settings, running_worker, write_song

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

#: ``MAX_ERROR_CHARS`` plus room for a path: what "bounded" means for a stored error message.
BOUNDED_CHARS = 2100
MAX_DURATION_S = 10.0


@dataclass(frozen=True)
class Case:
    """One kind of bad input: the raw body, the code it must fail with, and the id it is keyed by."""

    name: str
    body: bytes
    code: str
    key: str
    claimed: str | None = None


def body(request_id: object, file: object, **extra: object) -> bytes:
    return json.dumps({"request_id": request_id, "file": file, **extra}).encode()


def by_body(name: str, raw: bytes, code: str) -> Case:
    """A body without a usable id: its outcome is keyed by a digest of the body."""
    return Case(name, raw, code, rejected_id(raw))


def by_id(name: str, code: str, file: object = "good.wav", **extra: object) -> Case:
    """A body whose own (well-formed, unused) id keys its outcome."""
    return Case(name, body(name, file, **extra), code, name)


def make_media(media: Path, outside: Path) -> None:
    """The files of the matrix, inside (and a few outside) the media root."""
    song = demo_song(bpm=120.0, tonic=9, mode="minor", seconds=6.0, sample_rate=22050)
    write_song(media / "good.wav", seconds=6.0)
    write_song(media / "other.wav", bpm=128.0, tonic=2, mode="major", seconds=6.0)
    write_song(media / "long.wav", seconds=MAX_DURATION_S + 5.0)
    write_song(outside / "secret.wav", seconds=6.0)
    for ext in ("wav", "flac", "mp3"):
        full = media / f"full.{ext}"
        sf.write(full, song, 22050)
        data = full.read_bytes()
        (media / f"truncated.{ext}").write_bytes(data[: len(data) // 2])
        full.unlink()
    sf.write(media / "silent.wav", np.zeros(22050 * 6, dtype=np.float32), 22050)
    sf.write(media / "4khz.wav", np.full(4000 * 6, 0.1, dtype=np.float32), 4000)
    sf.write(media / "16ch.wav", np.tile(song[:, None], (1, 16)), 22050)
    (media / "empty.wav").write_bytes(b"")
    (media / "notes.mp3").write_text("this is a text file, not an mp3\n" * 40)
    (media / "a directory.wav").mkdir()
    os.mkfifo(media / "pipe.wav")
    # A character device inside the root (what /dev/zero is): never to be opened or read.
    os.mknod(media / "zero.wav", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    (media / "escape.wav").symlink_to(outside / "secret.wav")
    (media / "loop-a.wav").symlink_to(media / "loop-b.wav")
    (media / "loop-b.wav").symlink_to(media / "loop-a.wav")
    # 4 KB of RF64 declaring 150 GB of samples.
    declared = 150 * 2**30
    header = b"RF64" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
    header += b"ds64" + struct.pack("<IQQQI", 28, declared + 36, declared, declared // 4, 0)
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 2, 44100, 44100 * 4, 4, 16)
    header += b"data" + struct.pack("<I", 0xFFFFFFFF)
    (media / "huge.wav").write_bytes(header + b"\x01\x02" * ((4096 - len(header)) // 2))
    # A text file in the library that is an HLS playlist of media outside the root.
    segment = outside / "secret.ts"
    subprocess.run(
        [
            "ffmpeg",
            "-loglevel",
            "error",
            "-y",
            "-i",
            str(outside / "secret.wav"),
            "-c:a",
            "aac",
            str(segment),
        ],
        check=True,
    )
    (media / "playlist.m3u8").write_text(
        f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXTINF:6.0,\n{segment}\n#EXT-X-ENDLIST\n"
    )


def cases(media: Path, outside: Path, max_body_bytes: int) -> list[Case]:
    many = [f"a{i}" for i in range(10_000)]
    return [
        by_body("malformed JSON", b'{"request_id": "x", "file": ', "malformed_json"),
        by_body("a JSON array", b'["request_id", "file"]', "malformed_json"),
        by_body("a JSON number", b"42", "malformed_json"),
        by_body("a JSON string", b'"good.wav"', "malformed_json"),
        by_body("deeply nested JSON", b"[" * 100_00 + b"]" * 100_00, "malformed_json"),
        by_body("not UTF-8", b'{"request_id": "latin", "file": "caf\xe9.wav"}', "invalid_encoding"),
        by_body(
            "over max_body_bytes", body("big", "good.wav", pad="x" * max_body_bytes), "request_too_large"
        ),
        by_body("request_id a number", body(12345, "good.wav"), "invalid_request_id"),
        by_body("request_id with a quote", body("it's", "good.wav"), "invalid_request_id"),
        by_body("request_id missing", json.dumps({"file": "good.wav"}).encode(), "invalid_request_id"),
        by_id("file-missing-field", "invalid_file", file=None),
        by_id("file-a-list", "invalid_file", file=["good.wav"]),
        by_id("file-with-nul", "invalid_file", file="good\x00.wav"),
        by_id("file-with-escape", "invalid_file", file="good\x1b[2J.wav"),
        by_id("file-5000-chars", "invalid_file", file="a/" * 2500),
        by_id("correlation-with-nul", "invalid_correlation_id", correlation_id="corr\x00id"),
        by_id("priority-12", "invalid_priority", priority=12),
        by_id("priority-a-string", "invalid_priority", priority="high"),
        by_id("analyses-empty", "invalid_analyses", analyses=[]),
        by_id("analyses-a-string", "invalid_analyses", analyses="bpm"),
        by_id("analyses-repeated", "invalid_analyses", analyses=["bpm", "bpm"]),
        by_id("analyses-unknown", "unknown_analyzer", analyses=["bpm", "telepathy"]),
        by_id("options-unknown", "invalid_options", options={"colour": "red"}),
        by_id("bpm-range-narrow", "invalid_options", options={"bpm_range": [120, 130]}),
        by_id("bpm-range-300", "invalid_options", options={"bpm_range": [150, 300]}),
        by_body("analyses 10,000 names", body("many", "good.wav", analyses=many), "request_too_large"),
        by_id("traversal", "path_outside_media_root", file="../../../../etc/passwd"),
        by_id("absolute-outside", "path_outside_media_root", file=str(outside / "secret.wav")),
        by_id("symlink-outside", "path_outside_media_root", file="escape.wav"),
        by_id("symlink-loop", "file_unreadable", file="loop-a.wav"),
        by_id("missing", "file_not_found", file="nowhere/missing.flac"),
        by_id("directory", "file_unreadable", file="a directory.wav"),
        by_id("fifo", "file_unreadable", file="pipe.wav"),
        by_id("char-device", "file_unreadable", file="zero.wav"),
        by_id("zero-bytes", "empty_file", file="empty.wav"),
        by_id("text-as-mp3", "not_audio", file="notes.mp3"),
        by_id("truncated-wav", "truncated_audio", file="truncated.wav"),
        by_id("truncated-flac", "truncated_audio", file="truncated.flac"),
        by_id("truncated-mp3", "truncated_audio", file="truncated.mp3"),
        by_id("rf64-declaring-150gb", "truncated_audio", file="huge.wav"),
        by_id("hls-playlist-outside", "not_audio", file="playlist.m3u8"),
        by_id("silent", "silent_audio", file="silent.wav"),
        by_id("too-long", "too_long", file="long.wav"),
        by_id("rate-4khz", "unsupported_audio", file="4khz.wav"),
        by_id("16-channels", "unsupported_audio", file="16ch.wav"),
        # Reusing the id of a completed request (see the test): keyed by the body, never by the id.
        Case("same id, another file", body("taken", "other.wav"), "request_id_conflict", "", "taken"),
        Case(
            "invalid body, a taken id",
            body("taken", "good.wav", priority=99),
            "invalid_priority",
            "",
            "taken",
        ),
    ]


@pytest.fixture
def settings(
    tmp_path: Path, rabbit_url: str, pg_dsn: str, redis_settings: RedisSettings, bolt_server: Neo4jSettings
) -> Settings:
    s = make_settings(tmp_path, rabbit_url=rabbit_url, pg_dsn=pg_dsn, redis=redis_settings, graph=bolt_server)
    return s.model_copy(update={"engine": EngineSettings(max_duration_s=MAX_DURATION_S)})


def keyed(case: Case) -> Case:
    """Cases that reuse a taken id are keyed by ``rejected-<digest of the body>``."""
    if case.claimed is None:
        return case
    return Case(case.name, case.body, case.code, rejected_id(case.body), case.claimed)


async def test_every_kind_of_bad_input_fails_with_its_own_code(settings: Settings, tmp_path: Path) -> None:
    media = settings.worker.media_root
    outside = tmp_path / "outside"
    outside.mkdir()
    make_media(media, outside)
    matrix = [keyed(c) for c in cases(media, outside, settings.worker.max_body_bytes)]
    assert len({c.key for c in matrix}) == len(matrix), "two cases share a key"
    assert len(matrix) >= 25

    async with Broker(settings) as broker, running_worker(settings):
        await broker.publish({"request_id": "taken", "file": "good.wav", "correlation_id": "first"})
        [first] = await broker.results(1, timeout_s=60)
        assert first.status is ResultStatus.COMPLETED, first.error

        for case in matrix:
            await broker.publish(case.body)
        results = await broker.results(len(matrix), timeout_s=90)
        dead = await broker.drain(settings.rabbitmq.dead_letter_queue, len(matrix), timeout_s=30)

        # The worker still serves a good request.
        await broker.publish({"request_id": "after", "file": "other.wav"})
        [after] = await broker.results(1, timeout_s=60)
        assert after.status is ResultStatus.COMPLETED, after.error
        extra_dead = await broker.drain_now(settings.rabbitmq.dead_letter_queue)
        extra_results = await broker.drain_now(settings.rabbitmq.results_queue)

    by_key = {r.request_id: r for r in results}
    problems = []
    for case in matrix:
        result = by_key.get(case.key)
        if result is None:
            problems.append(f"{case.name}: no result keyed {case.key!r}")
            continue
        got = result.error.code if result.error else None
        if result.status is not ResultStatus.FAILED or got != case.code:
            problems.append(f"{case.name}: {result.status.value} {got!r}, expected {case.code!r}")
        if result.claimed_request_id != case.claimed:
            problems.append(f"{case.name}: claimed_request_id {result.claimed_request_id!r}")
        if result.error is not None and len(result.error.message) >= BOUNDED_CHARS:
            problems.append(f"{case.name}: error message of {len(result.error.message)} chars")
    assert not problems, "\n".join(problems)
    assert sorted(m.body for m in dead) == sorted(c.body for c in matrix), "dead letters differ"
    assert (extra_dead, extra_results) == ([], []), "a bad request was announced or dead-lettered twice"

    await check_postgres(settings.postgres.dsn, matrix, first, lambda r: r.request_id == "after")


async def check_postgres(
    dsn: str,
    matrix: list[Case],
    first: AnalysisResultMessage,
    is_after: Callable[[AnalysisResultMessage], bool],
) -> None:
    """Each case's outcome is in both tables with its code; the first owner of the id is untouched."""
    conn = await asyncpg.connect(dsn)
    try:
        results = {
            r["request_id"]: r
            for r in await conn.fetch(
                "SELECT request_id, status, error_code, error_message, result FROM analysis_results"
            )
        }
        ledger = {
            r["request_id"]: r
            for r in await conn.fetch("SELECT request_id, status, error_code FROM requests")
        }
    finally:
        await conn.close()
    assert len(results) == len(matrix) + 2  # the matrix, "taken" and "after"
    for case in matrix:
        row, entry = results[case.key], ledger[case.key]
        assert (row["status"], row["error_code"]) == ("failed", case.code), case.name
        assert (entry["status"], entry["error_code"]) == ("failed", case.code), case.name
        assert len(row["error_message"]) < BOUNDED_CHARS, case.name
    taken = results["taken"]
    assert (taken["status"], ledger["taken"]["status"]) == ("completed", "completed")
    assert AnalysisResultMessage.model_validate_json(taken["result"]) == first
