"""Prometheus metrics, collected from the hub's own counters when scraped.

A custom collector (rather than Counter.inc on every message) keeps the per-message path free
of metrics work, and a registry per hub keeps tests independent of each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from carehub.store.outbox import Outbox

if TYPE_CHECKING:
    from carehub.hub import Hub


class HubCollector(Collector):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        messages = CounterMetricFamily(
            "carehub_intake_messages",
            "Frames answered by intake, by listener and outcome",
            labels=["listener", "outcome"],
        )
        for (listener, outcome), count in sorted(self.hub.intake.counts.items()):
            messages.add_metric([listener, outcome], count)
        yield messages
        commits = CounterMetricFamily(
            "carehub_store_commits", "Group commits made by the store writer"
        )
        commits.add_metric([], self.hub.writer.batches)
        yield commits
        rows = CounterMetricFamily("carehub_store_rows", "Messages written by the store writer")
        rows.add_metric([], self.hub.writer.rows)
        yield rows
        worker = self.hub.worker
        if worker is not None:
            for name, help_text, value in (
                ("carehub_routed_messages", "Messages routed by this hub's worker", worker.routed),
                (
                    "carehub_deliveries_sent",
                    "Deliveries accepted by their destination",
                    worker.delivered,
                ),
                (
                    "carehub_delivery_failures",
                    "Delivery attempts that failed",
                    worker.failed_attempts,
                ),
            ):
                family = CounterMetricFamily(name, help_text)
                family.add_metric([], value)
                yield family
        if self.hub.store is not None:
            backlog = GaugeMetricFamily(
                "carehub_deliveries", "Deliveries in the store by status", labels=["status"]
            )
            for status, count in Outbox(self.hub.store).count_by_status().items():
                backlog.add_metric([status], count)
            yield backlog
        connections = GaugeMetricFamily(
            "carehub_mllp_connections", "Open MLLP connections", labels=["listener"]
        )
        shed = CounterMetricFamily(
            "carehub_mllp_connections_shed",
            "MLLP connections closed because their peer went over max_connections_per_peer",
            labels=["listener"],
        )
        for listener in self.hub.mllp_listeners:
            connections.add_metric([listener.name], listener.open_connections)
            shed.add_metric([listener.name], listener.connections_shed)
        yield connections
        yield shed


def make_registry(hub: Hub) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(hub))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
