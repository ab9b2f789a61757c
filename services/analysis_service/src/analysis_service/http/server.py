"""The worker's HTTP endpoint: Prometheus metrics, liveness and readiness.

=============  ======================================================================================
``/metrics``   the :class:`~analysis_service.metrics.Metrics` registry (memory sampled per scrape)
``/health``    liveness: ``200 {"status": "ok"}`` whenever the event loop answers
``/ready``     readiness: every check run concurrently, each within ``check_timeout_s``; ``200``
               with ``{"status": "ready", "checks": {name: {"ok": true}}}`` or ``503`` with
               ``{"status": "not ready", "checks": {name: {"ok": false, "error": "..."}}}``
=============  ======================================================================================

A readiness check is an ``async`` callable that returns when its dependency is usable and raises
(any exception) when it is not. Requests are not logged; a change of readiness is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import structlog
from aiohttp import hdrs, web

from analysis_service.metrics import Metrics
from analysis_service.settings import HttpSettings

log = structlog.get_logger(__name__)

#: Seconds each readiness check may take before it counts as failed.
DEFAULT_CHECK_TIMEOUT_S: Final = 2.0

#: A readiness check: returns when the dependency is usable, raises when it is not.
ReadinessCheck = Callable[[], Awaitable[None]]


class HttpServer:
    """Serves ``/metrics``, ``/health`` and ``/ready`` on ``settings.host:settings.port``.

    Parameters
    ----------
    settings : HttpSettings
        Where to listen; port 0 picks a free port (see :attr:`port`).
    metrics : Metrics
        The registry served on ``/metrics``.
    checks : mapping of str to async callable
        Readiness checks by name (e.g. ``"rabbitmq"``, ``"postgres"``).
    check_timeout_s : float
        Seconds each check may take on ``/ready`` before it counts as failed.

    Notes
    -----
    The constructor does no I/O; :meth:`start` binds the socket and :meth:`stop` releases it.
    """

    def __init__(
        self,
        settings: HttpSettings,
        metrics: Metrics,
        checks: Mapping[str, ReadinessCheck],
        *,
        check_timeout_s: float = DEFAULT_CHECK_TIMEOUT_S,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._checks = dict(checks)
        self._check_timeout_s = check_timeout_s
        self._runner: web.AppRunner | None = None
        self._was_ready: bool | None = None

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with port 0).

        Raises
        ------
        RuntimeError
            When the server is not running.
        """
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the HTTP server is not running: call start() first")
        address: Any = self._runner.addresses[0]
        return int(address[1])

    async def start(self) -> None:
        """Bind ``host:port`` and start serving.

        Raises
        ------
        RuntimeError
            When already started.
        OSError
            When the address cannot be bound (e.g. the port is in use); the message names it.
        """
        if self._runner is not None:
            raise RuntimeError("the HTTP server is already running")
        app = web.Application()
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/health", self._handle_health)
        app.router.add_get("/ready", self._handle_ready)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = self._settings.host, self._settings.port
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(exc.errno, f"HTTP server cannot listen on {host}:{port}: {exc.strerror}") from exc
        self._runner = runner
        log.info("http server listening", host=host, port=self.port)

    async def stop(self) -> None:
        """Stop serving and release the socket (does nothing when not running)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("http server stopped")

    # ------------------------------------------------------------------ handlers
    async def _handle_metrics(self, _request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self._scrape)  # psutil walks /proc: keep it off the loop
        return web.Response(body=body, headers={hdrs.CONTENT_TYPE: self._metrics.content_type})

    def _scrape(self) -> bytes:
        self._metrics.sample_memory()
        return self._metrics.render()

    async def _handle_health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _handle_ready(self, _request: web.Request) -> web.Response:
        names = list(self._checks)
        errors = await asyncio.gather(*(self._run_check(self._checks[name]) for name in names))
        checks: dict[str, dict[str, Any]] = {
            name: {"ok": True} if error is None else {"ok": False, "error": error}
            for name, error in zip(names, errors, strict=True)
        }
        ready = all(error is None for error in errors)
        if ready != self._was_ready:
            if ready:
                log.info("ready")
            else:
                failing = {name: check["error"] for name, check in checks.items() if not check["ok"]}
                log.warning("not ready", failing=failing)
            self._was_ready = ready
        if ready:
            return web.json_response({"status": "ready", "checks": checks})
        return web.json_response({"status": "not ready", "checks": checks}, status=503)

    async def _run_check(self, check: ReadinessCheck) -> str | None:
        """``None`` when ``check`` returned in time, else ``"ExceptionType: message"``."""
        try:
            await asyncio.wait_for(check(), timeout=self._check_timeout_s)
        except TimeoutError as exc:  # wait_for's own has no message; a check's own may have one
            return f"TimeoutError: {str(exc) or f'no answer within {self._check_timeout_s:g} s'}"
        except Exception as exc:  # a check fails by raising anything; the reason goes in the reply
            text = str(exc)
            return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        return None
