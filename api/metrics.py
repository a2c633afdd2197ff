"""Prometheus metrics computed at scrape time from the database and the heartbeat table.

Nothing is counted in this process: one scrape of the API shows the whole
pipeline, whichever hosts its workers run on, and survives API restarts.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from preread.api.health import SEEN_WITHIN
from preread.schemas.settings import Settings
from preread.schemas.tables import Delivery, DeliveryState, Heartbeat, Outbox, ParseStatus, ProbeScore, Report, Study, StudyState, utcnow
from preread.worker.inference.thresholds import ProbeThreshold, threshold_for

log = logging.getLogger(__name__)

#: Stage timings a report records (seconds), and the histogram buckets.
STAGES = ("prepare_s", "queue_s", "preprocess_s", "generate_s")
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BROKER_TIMEOUT_S = 2.0

_broker_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue-depths")


def _modality(value: str | None) -> str:
    return (value or "").split("\\")[0] or "unknown"


class PipelineCollector(Collector):
    """Collects every metric from one database session per scrape."""

    def __init__(self, sessions: Callable[[], Session], settings: Settings, thresholds: dict[str, ProbeThreshold],
                 queue_depths: Callable[[], dict[str, int | None]] | None = None) -> None:
        self.sessions, self.settings, self.thresholds, self.queue_depths = sessions, settings, thresholds, queue_depths

    def collect(self) -> Iterator[Metric]:
        session = self.sessions()
        try:
            yield from self._studies(session)
            yield from self._reports(session)
            yield from self._probes(session)
            yield from self._queues(session)
            yield from self._processes(session)
            yield from self._deliveries(session)
        finally:
            session.close()

    def _studies(self, session: Session) -> Iterator[Metric]:
        received: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        states: Counter[str] = Counter({str(s): 0 for s in StudyState})
        for modalities, state, n in session.execute(
            select(Study.modalities, Study.state, func.count()).group_by(Study.modalities, Study.state)
        ):
            received[_modality(modalities)] += n
            states[state] += n
            if state == StudyState.FAILED:
                failed[_modality(modalities)] += n
        counter = CounterMetricFamily("preread_studies_received", "Studies received, by first modality.", labels=["modality"])
        for modality, n in sorted(received.items()):
            counter.add_metric([modality], n)
        yield counter
        gauge = GaugeMetricFamily("preread_studies_failed", "Studies FAILED now, by first modality.", labels=["modality"])
        for modality, n in sorted(failed.items()):
            gauge.add_metric([modality], n)
        yield gauge
        gauge = GaugeMetricFamily("preread_studies", "Studies per pipeline state.", labels=["state"])
        for state, n in sorted(states.items()):
            gauge.add_metric([state], n)
        yield gauge

    def _reports(self, session: Session) -> Iterator[Metric]:
        drafted = CounterMetricFamily("preread_studies_drafted", "Drafts stored (every run), by first modality.", labels=["modality"])
        invalid = 0
        by_modality: Counter[str] = Counter()
        for modalities, status, n in session.execute(
            select(Study.modalities, Report.parse_status, func.count())
            .join(Study, Study.id == Report.study_id)
            .group_by(Study.modalities, Report.parse_status)
        ):
            by_modality[_modality(modalities)] += n
            if status != ParseStatus.OK:
                invalid += n
        for modality, n in sorted(by_modality.items()):
            drafted.add_metric([modality], n)
        yield drafted
        yield CounterMetricFamily("preread_drafts_schema_invalid", "Drafts whose output did not parse into the findings schema.", value=invalid)

        histogram = HistogramMetricFamily("preread_stage_duration_seconds", "Inference stage durations per draft.", labels=["stage"])
        for stage in STAGES:
            value = Report.timings[stage].as_float()
            row = session.execute(
                select(func.count(value), func.coalesce(func.sum(value), 0.0),
                       *[func.coalesce(func.sum(case((value <= b, 1), else_=0)), 0) for b in BUCKETS])
            ).one()
            count, total, cumulative = int(row[0]), float(row[1]), [int(x) for x in row[2:]]
            buckets = [(str(b), c) for b, c in zip(BUCKETS, cumulative)] + [("+Inf", count)]
            histogram.add_metric([stage], buckets=buckets, sum_value=total)
        yield histogram

        info = GaugeMetricFamily("preread_model_info", "The model and prompt of the newest draft.",
                                 labels=["model", "revision", "prompt_version"])
        newest = session.execute(
            select(Report.model_id, Report.model_revision, Report.prompt_version).order_by(Report.id.desc()).limit(1)
        ).first()
        if newest is not None:
            info.add_metric([newest[0], newest[1] or "", newest[2]], 1)
        yield info

    def _probes(self, session: Session) -> Iterator[Metric]:
        metric = GaugeMetricFamily("preread_probe_positives", "Studies whose current probe score is at or above its threshold.",
                                   labels=["probe"])
        positives: Counter[str] = Counter()
        for condition, score in session.execute(
            select(ProbeScore.condition, ProbeScore.score).where(ProbeScore.current)
        ):
            positives[condition] += int(score >= threshold_for(self.thresholds, condition, self.settings).priority)
        for condition, n in sorted(positives.items()):
            metric.add_metric([condition], n)
        yield metric

    def _queues(self, session: Session) -> Iterator[Metric]:
        pending = GaugeMetricFamily("preread_outbox_pending", "Hand-offs committed but not yet published, by topic.", labels=["topic"])
        for topic, n in session.execute(
            select(Outbox.topic, func.count()).where(Outbox.sent_at.is_(None)).group_by(Outbox.topic)
        ):
            pending.add_metric([topic], n)
        yield pending
        depth = GaugeMetricFamily("preread_queue_depth", "Messages waiting in the broker, by queue.", labels=["queue"])
        if self.queue_depths is not None:
            try:
                depths = _broker_pool.submit(self.queue_depths).result(timeout=BROKER_TIMEOUT_S)
            except FutureTimeout:
                depths = {}
            except Exception as exc:
                log.warning("queue depths unavailable: %s", type(exc).__name__)
                depths = {}
            for queue, waiting in sorted(depths.items()):
                if waiting is not None:
                    depth.add_metric([queue], waiting)
        yield depth

    def _processes(self, session: Session) -> Iterator[Metric]:
        rows = list(session.scalars(select(Heartbeat).where(Heartbeat.last_seen >= utcnow() - SEEN_WITHIN)))
        processes: Counter[tuple[str, str]] = Counter((r.role, r.state) for r in rows)
        metric = GaugeMetricFamily("preread_processes", "Processes seen in the last 60 s, by role and state.", labels=["role", "state"])
        for (role, state), n in sorted(processes.items()):
            metric.add_metric([role, state], n)
        yield metric

    def _deliveries(self, session: Session) -> Iterator[Metric]:
        """Deliveries of current reports that failed for good or whose last attempt failed, by destination."""
        troubled = or_(Delivery.state == DeliveryState.FAILED,
                       Delivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING]) & Delivery.last_error.is_not(None))
        gauge = GaugeMetricFamily("preread_export_failures",
                                  "Deliveries of current reports failed or retrying after an error, by destination.",
                                  labels=["destination"])
        for destination, n in session.execute(
            select(Delivery.destination, func.count())
            .join(Report, Report.id == Delivery.report_id)
            .where(Report.current.is_(True), troubled)
            .group_by(Delivery.destination)
            .order_by(Delivery.destination)
        ):
            gauge.add_metric([destination], n)
        yield gauge


def registry_for(collector: PipelineCollector) -> CollectorRegistry:
    """A registry of its own (not the process-global one) holding ``collector``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
