"""Prometheus metrics of a running :class:`~ffm_hub.hub.Hub` over HTTP (``GET /metrics``).

Nothing in the hub is instrumented: :class:`HubCollector` reads the hub's counters, its store and its
latest version at scrape time, so the numbers are exactly what the hub itself holds. Counters count
since this process started (Prometheus handles the reset at a restart); the queue and the version
come from the durable store.

``prometheus-client`` is imported only when metrics are used; without it a :class:`ConfigError`
names the package to install.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ffm_edge.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from ffm_hub.hub import Hub

__all__ = ["HubCollector", "MetricsServer", "start_metrics_server"]

log = logging.getLogger("ffm.hub.metrics")

_PACKAGE = "prometheus-client"


def _prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError as exc:
        raise ConfigError(f"metrics need the {_PACKAGE} package: pip install {_PACKAGE}") from exc
    return prometheus_client


class HubCollector:
    """A prometheus_client collector: metric families computed from ``hub`` at each scrape."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Any]:
        core = _prometheus().core
        hub = self.hub
        counters = dict(hub.counters)
        settings = hub.settings

        info = core.GaugeMetricFamily(
            "ffm_hub_info", "The hub (always 1)", labels=["federation", "hub_id", "model", "strategy"]
        )
        info.add_metric([settings.federation, settings.hub_id, settings.model, settings.strategy], 1.0)
        yield info
        yield core.CounterMetricFamily(
            "ffm_updates_accepted", "Updates accepted into the queue", value=counters.get("accepted", 0)
        )
        yield core.CounterMetricFamily(
            "ffm_updates_duplicate",
            "Updates received again after being accepted (receipted, not queued twice)",
            value=counters.get("duplicates", 0),
        )
        rejected = core.CounterMetricFamily("ffm_updates_rejected", "Updates rejected, by reason", labels=["reason"])
        for reason, count in sorted(dict(hub.rejections).items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield core.CounterMetricFamily(
            "ffm_versions", "Global versions committed by this process", value=counters.get("versions", 0)
        )
        yield core.GaugeMetricFamily("ffm_tau", "Queued updates that trigger an aggregation", value=float(settings.tau))
        yield core.GaugeMetricFamily("ffm_devices_online", "Devices heard from recently", value=len(hub.online))
        yield core.GaugeMetricFamily("ffm_devices_known", "Devices ever heard from", value=len(hub.devices))
        # Bytes of the round in progress (reset at each version; the version's own totals are below).
        for direction in ("in", "out"):
            value = getattr(hub, f"_bytes_{direction}", None)
            if isinstance(value, int):
                yield core.GaugeMetricFamily(
                    f"ffm_round_bytes_{direction}",
                    f"Update bytes {'received' if direction == 'in' else 'sent'} since the last global version",
                    value=float(value),
                )
        try:
            queue_length = len(hub.store.queued())
            latest = hub.store.latest_version()
        except Exception as exc:  # a closed or failing store must not break the scrape
            log.warning("metrics: cannot read the hub's store: %s", exc)
            return
        yield core.GaugeMetricFamily("ffm_queue_length", "Accepted updates not yet aggregated", value=queue_length)
        if latest is None:
            return
        yield core.GaugeMetricFamily("ffm_global_version", "Id of the newest global version", value=latest.version)
        yield core.GaugeMetricFamily(
            "ffm_global_version_updates", "Updates aggregated into the newest global version", value=latest.num_updates
        )
        yield core.GaugeMetricFamily(
            "ffm_global_version_created_timestamp_seconds",
            "When the newest global version was made (Unix time)",
            value=latest.created_at,
        )
        version_metrics = core.GaugeMetricFamily(
            "ffm_global_version_metric",
            "Metrics of the newest global version (accuracy, aggregation_s, bytes_in, bytes_out, ...)",
            labels=["name"],
        )
        for name, value in sorted(latest.metrics.items()):
            version_metrics.add_metric([name], float(value))
        yield version_metrics


class MetricsServer:
    """The HTTP endpoint serving one hub's metrics; :meth:`stop` closes it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread, addr: str) -> None:
        self._server = server
        self._thread = thread
        self.addr = addr
        self.port = int(server.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_metrics_server(hub: Hub, port: int, addr: str = "127.0.0.1") -> tuple[MetricsServer, int]:
    """Serve ``hub``'s metrics on ``addr:port`` (port 0: any free one) from a registry of its own.

    Returns the server (``stop()`` it) and the port it listens on.
    """
    prometheus_client = _prometheus()
    if not 0 <= port <= 65535:
        raise ConfigError(f"metrics port must be in [0, 65535], got {port}")
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(hub))
    try:
        server, thread = prometheus_client.start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from exc
    metrics = MetricsServer(server, thread, addr)
    log.info("metrics at %s", metrics.url)
    return metrics, metrics.port
