"""The running agent's Prometheus metrics: what is declared, and the collector that reads the
stages (sampler, queue, writer, uplink, link, analyzer) when the registry is rendered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.metrics import Registry

if TYPE_CHECKING:
    from agent.service.runtime import Agent


def register_metrics(agent: Agent, m: Registry) -> None:
    """Declare the agent's metrics on ``m`` and a collector that fills them from ``agent``."""
    readings = m.counter("readings_total", "Readings taken, by sensor", ["sensor"])
    errors = m.counter("sensor_errors_total", "Failed sensor reads, by sensor", ["sensor"])
    up = m.gauge("sensor_up", "1 when the sensor's last read succeeded", ["sensor"])
    depth = m.gauge("queue_depth", "Records queued, by kind", ["kind"])
    qbytes = m.gauge("queue_bytes", "Payload bytes queued, by kind", ["kind"])
    evicted = m.counter("queue_evicted_total", "Records evicted for the budget", ["kind"])
    file_bytes = m.gauge("queue_file_bytes", "Size of the queue files on disk")
    dropped = m.counter("telemetry_dropped_total", "Readings dropped before the store", ["reason"])
    uptime = m.gauge("uptime_seconds", "Seconds since the agent started")
    up_bytes = m.counter("uplink_bytes_total", "Batch bytes sent to the cloud endpoint")
    up_records = m.counter("uplink_records_total", "Records acknowledged by the endpoint")
    up_batches = m.counter("uplink_batches_total", "Batches sent, by outcome", ["outcome"])
    rtt = m.gauge("link_rtt_seconds", "Smoothed round-trip time to the endpoint")
    loss = m.gauge("link_loss_ratio", "Share of exchanges retransmitted or lost")
    link_state = m.gauge("link_state", "1 for the link's current state", ["state"])

    def collect() -> None:
        assert agent.sampler is not None
        for name, h in agent.sampler.health.items():
            readings.set_total(h.reads, sensor=name)
            errors.set_total(h.errors, sensor=name)
            up.set(1.0 if h.state.value == "ok" else 0.0, sensor=name)
        stats = agent.last_stats
        if stats is not None:
            for kind, ks in stats.kinds.items():
                depth.set(ks.depth, kind=kind)
                qbytes.set(ks.bytes, kind=kind)
                evicted.set_total(ks.evicted, kind=kind)
            file_bytes.set(stats.file_bytes)
        if agent.writer is not None:
            dropped.set_total(agent.writer.dropped_full, reason="store_full")
            dropped.set_total(agent.writer.dropped_overflow, reason="overflow")
        uptime.set(agent.clock.monotonic() - agent.started)
        link = agent.link_status()
        for state in ("high", "medium", "low", "offline", "disabled"):
            link_state.set(1.0 if link["state"] == state else 0.0, state=state)
        if agent.uplink is not None:
            st = agent.uplink.stats
            up_bytes.set_total(st.bytes_sent)
            up_records.set_total(st.records_acked)
            up_batches.set_total(st.batches_acked, outcome="acked")
            up_batches.set_total(st.batches_failed, outcome="failed")
            if link["rtt_ms"] is not None:
                rtt.set(link["rtt_ms"] / 1000)
            if link["loss"] is not None:
                loss.set(link["loss"])

    m.collector(collect)
    if agent.analyzer is not None:
        m.collector(agent.analyzer.register_metrics(m))
