"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

__all__ = ["STAGE_BUCKETS", "Metrics"]

STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters the routes and the run manager update; ``render()`` for ``GET /metrics``."""

    def __init__(self) -> None:
        self.runs_started = 0
        self.runs_finished: Counter[str] = Counter()
        self.runs_rejected: Counter[str] = Counter()
        self.answers: Counter[str] = Counter()
        self.streams_active = 0
        self.streams_opened = 0
        self.streams_dropped = 0
        self.events_sent = 0
        self.stage_buckets: dict[tuple[str, str], list[int]] = {}
        self.stage_sum: dict[tuple[str, str], float] = {}
        self.stage_count: Counter[tuple[str, str]] = Counter()
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def observe_stage(self, kind: str, status: str, seconds: float) -> None:
        key = (kind, status)
        buckets = self.stage_buckets.get(key)
        if buckets is None:
            buckets = self.stage_buckets[key] = [0] * len(STAGE_BUCKETS)
        for i, bound in enumerate(STAGE_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
        self.stage_sum[key] = self.stage_sum.get(key, 0.0) + seconds
        self.stage_count[key] += 1

    def add_gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def count_dropped(self) -> None:
        self.streams_dropped += 1

    def count_sent(self, n: int) -> None:
        self.events_sent += n

    def render(self) -> str:
        out: list[str] = []

        def head(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        head("stagecast_runs_started_total", "counter", "Runs started.")
        out.append(f"stagecast_runs_started_total {self.runs_started}")
        head("stagecast_runs_finished_total", "counter", "Runs finished, by run-end status.")
        for status in ("succeeded", "failed", "cancelled"):
            out.append(
                f'stagecast_runs_finished_total{{status="{status}"}} {self.runs_finished[status]}'
            )
        head("stagecast_runs_rejected_total", "counter", "Run requests refused, by reason.")
        for reason, n in sorted(self.runs_rejected.items()):
            out.append(f'stagecast_runs_rejected_total{{reason="{_label(reason)}"}} {n}')
        head("stagecast_answers_total", "counter", "Answers to input stages, by outcome.")
        for outcome in ("accepted", "refused", "not_waiting"):
            out.append(f'stagecast_answers_total{{outcome="{outcome}"}} {self.answers[outcome]}')
        head("stagecast_streams_active", "gauge", "Open event streams.")
        out.append(f"stagecast_streams_active {self.streams_active}")
        head("stagecast_streams_opened_total", "counter", "Event streams opened.")
        out.append(f"stagecast_streams_opened_total {self.streams_opened}")
        head(
            "stagecast_streams_dropped_total",
            "counter",
            "Streams dropped because the viewer stopped reading (viewer_send_timeout).",
        )
        out.append(f"stagecast_streams_dropped_total {self.streams_dropped}")
        head("stagecast_events_sent_total", "counter", "Events written to streams (all viewers).")
        out.append(f"stagecast_events_sent_total {self.events_sent}")
        for name, (help_text, read) in self.gauges.items():
            head(name, "gauge", help_text)
            out.append(f"{name} {read():g}")
        name = "stagecast_stage_duration_seconds"
        head(name, "histogram", "Top-level stage durations, by kind and status.")
        for (kind, status), buckets in sorted(self.stage_buckets.items()):
            labels = f'kind="{_label(kind)}",status="{_label(status)}"'
            for bound, n in zip(STAGE_BUCKETS, buckets, strict=True):
                out.append(f'{name}_bucket{{{labels},le="{bound:g}"}} {n}')
            count = self.stage_count[(kind, status)]
            out.append(f'{name}_bucket{{{labels},le="+Inf"}} {count}')
            out.append(f"{name}_sum{{{labels}}} {self.stage_sum[(kind, status)]:.6f}")
            out.append(f"{name}_count{{{labels}}} {count}")
        return "\n".join(out) + "\n"
