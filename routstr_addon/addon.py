"""mitmproxy entry point: ``mitmdump --mode reverse:<upstream> -s routstr_addon/addon.py``.

``Routstr`` adds the settings as options and, each time they change, builds one ``Runtime``
and serves it with sub-addons, one concern each: the endpoints answered here, the paid forward,
the background work, and (under mitmweb) the scrubbing of secrets from what it shows. Until a
runtime is built, every request is refused: nothing unpaid is ever forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http

try:
    import routstr_addon  # noqa: F401
except ImportError:  # loaded by path (mitmdump -s) from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routstr_addon import settings
from routstr_addon.background import Background
from routstr_addon.errors import ApiError, install_error_pages
from routstr_addon.observe.flows import FlowObserver
from routstr_addon.observe.jsonlog import use_json_logs
from routstr_addon.observe.quiet import close_connections, quiet_shutdown
from routstr_addon.proxy.cors import Cors
from routstr_addon.proxy.forward import PaidForward
from routstr_addon.proxy.gate import Gate
from routstr_addon.proxy.listen import ListenBacklog
from routstr_addon.proxy.local import LocalEndpoints
from routstr_addon.proxy.webview import FlowView
from routstr_addon.runtime import Runtime
from routstr_addon.settings import Config, SettingError

__all__ = ["NotConfigured", "Routstr", "Serving", "addons"]

logger = logging.getLogger("routstr")

_OUR_OPTIONS = frozenset(s.option for s in settings.SETTINGS)


class Serving:
    """One runtime's hooks: the gate (what no endpoint takes), the local endpoints, the paid
    forward, the observer of each request's end (its log line, its metrics) and CORS; and the
    background work that starts when mitmproxy runs and ends when it stops."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.background = Background(runtime)
        self.backlog = ListenBacklog(runtime.config.listen_backlog)
        # CORS last: its preflight answer comes at requestheaders, after the gate's checks and
        # before any request hook, and its headers go on whatever answer the others made. The
        # observer only reads what the paid forward settled.
        self.addons: list[Any] = [Gate(), LocalEndpoints(runtime.services), PaidForward(runtime)]
        config = runtime.config
        self.observer: FlowObserver | None = None
        if config.log_format != "off" or runtime.metrics is not None:
            self.observer = FlowObserver(config.log_format, runtime.metrics, runtime.meter)
            self.addons.append(self.observer)
        self.addons.append(Cors(config.cors_origins))
        self.listener: Any = None
        if runtime.metrics is not None and config.metrics_port:
            from routstr_addon.observe.exposition import MetricsListener

            self.listener = MetricsListener(runtime.metrics, config.metrics_port)

    def running(self) -> None:
        self.background.start()
        self.backlog.start()
        if self.listener is not None:
            asyncio.get_running_loop().create_task(self.listener.start())

    async def done(self) -> None:
        await close_connections()  # ended here, they end quietly (see observe.quiet)
        if self.observer is not None:
            self.observer.done()  # their lines too
        self.background.stop()
        self.backlog.stop()
        if self.listener is not None:
            self.listener.stop()
        await self.runtime.close()

    def retire(self, successor: Runtime) -> None:
        """Replaced by a new configuration: stop the timers, pass on the settlements still
        waiting for the ledger, and let the old connections go (a request still in flight on
        them reopens its ledger's connection to settle)."""
        self.background.stop()
        self.backlog.stop()
        if self.listener is not None:
            self.listener.stop()
        successor.meter.take_unsettled(self.runtime.meter)
        self.runtime.ledger.close()
        if self.runtime.wallet is not None:
            with contextlib.suppress(RuntimeError):  # no loop yet: nothing was opened
                asyncio.get_running_loop().create_task(self.runtime.wallet.close())


class NotConfigured:
    """Until settings are valid: every request gets a 503, none goes out."""

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            flow.response = ApiError(503, "The proxy is not configured.", "server_error",
                                     "not_configured").response()


class Routstr:
    """The paying proxy: one instance per mitmproxy process."""

    def __init__(self) -> None:
        self.view = FlowView()
        self.serving: Serving | NotConfigured = NotConfigured()
        self.addons: list[Any] = [self.view, self.serving]
        self._config: Config | None = None
        self._env_errors: list[str] = []
        self._running = False
        self._metrics: Any = None  # the process's metrics, made when first turned on

    def load(self, loader: Any) -> None:
        report = settings.startup_report()
        for line in report.notes:
            logger.info("routstr: %s", line)
        for line in report.warnings:
            logger.warning("routstr: %s", line)
        if report.log_level:  # routstr-core's LOG_LEVEL: the proxy's own loggers
            for name in ("routstr", "routstr_addon"):
                logging.getLogger(name).setLevel(report.log_level)
        self._env_errors = report.errors + settings.register(loader)
        install_error_pages()
        quiet_shutdown()

    def configure(self, updated: set[str]) -> None:
        if not (updated & _OUR_OPTIONS) and self._config is not None:
            return
        previous = self.serving if isinstance(self.serving, Serving) else None
        try:
            if self._env_errors:
                raise SettingError(self._env_errors[0])
            config = Config.from_options(ctx.options)
            if config == self._config:
                return  # options set again to the same values
            runtime = Runtime.build(config, previous.runtime.services.admin if previous else None,
                                    self._metrics_for(config))
        except Exception as e:
            message = str(e) if isinstance(e, SettingError) else f"cannot start: {e}"
            if self._config is None:
                # At start-up: one clear line; mitmdump exits on an error logged while starting,
                # and until then every request is refused (nothing is forwarded).
                logger.error("routstr: %s", message)
                return
            raise exceptions.OptionsError(message) from None  # a live change: refuse it
        self.serving = Serving(runtime)
        self.addons = [self.view, self.serving]
        self._config = config
        use_json_logs(config.log_format == "json")
        if previous is not None:
            previous.retire(runtime)
        # Requests we answer ourselves must not open an upstream connection first.
        ctx.options.update(connection_strategy="lazy", body_size_limit=str(config.max_request_size))
        if self._running:  # reconfigured while running: mitmproxy will not call `running` again
            self.serving.running()
        logger.info("routstr: %s pricing, ledger %s, %s",
                    "model-based" if config.model_based_pricing else "fixed",
                    config.database_url.split("://")[0], _providers_line(config))

    def _metrics_for(self, config: Config) -> Any:
        """The process's metrics if METRICS_TOKEN or METRICS_PORT turns them on (counters
        carry over when the settings change)."""
        if not (config.metrics_token or config.metrics_port):
            return None
        if self._metrics is None:
            from routstr_addon.observe.metrics import Metrics

            self._metrics = Metrics()
        return self._metrics

    def running(self) -> None:
        self._running = True
        # Everything loaded at start-up lives as long as the process: keep it out of the
        # garbage collector's full passes, which otherwise stall requests for tens of ms.
        gc.freeze()


def _providers_line(config: Config) -> str:
    """Where requests go, for the start-up line (names and URLs, never keys)."""
    providers = config.providers
    if len(providers) == 1 and providers[0].shorthand:
        only = providers[0]
        return f"upstream {only.base_url}" if only.upstream else "upstream from the reverse mode"
    return "providers " + ", ".join(f"{p.name} ({p.base_url})" for p in providers)


addons = [Routstr()]
