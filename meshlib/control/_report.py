"""Data-plane reports: a compact summary of a mesh's RED metrics and engine state, and the rates made from them.

Each data plane already counts every request in its Prometheus registry
(``meshlib_requests_total``, ``meshlib_request_errors_total``,
``meshlib_request_duration_milliseconds``). The agent reads that registry every
``report_interval`` seconds and posts a summary to the control plane
(``POST /v1/report``): cumulative counters per edge (reporter, source workload,
destination service), the duration histogram's cumulative buckets, the circuit
breakers not closed, the ejected endpoints and the workload certificate's expiry.

The control plane keeps the last reports of each data plane in memory and makes
rates from the difference between two of them (as Prometheus' ``rate`` and
``histogram_quantile`` do): counters are cumulative, so a lost report loses no
request, only resolution.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..telemetry._metrics import DURATION_BUCKETS_MS

if TYPE_CHECKING:
    from ..mesh import Mesh

__all__ = ["RATE_WINDOW", "Reports", "quantile", "summarize"]

RATE_WINDOW = 10.0
"""Seconds of reports a rate is made over (the oldest report within it and the newest)."""
KEEP_FOR = 60.0
"""A data plane's reports are dropped once its newest is this old (it went away)."""
_MAX_EDGES = 500
"""Edges one report may carry (a guard: the metrics' labels are bounded by the configuration)."""

_EdgeKey = tuple[str, str, str, str]  # reporter, source workload, source namespace, destination service


def summarize(mesh: Mesh) -> dict[str, Any]:
    """What a data plane reports: cumulative RED counters per edge, open breakers, ejections, its certificate."""
    edges: dict[_EdgeKey, dict[str, Any]] = {}
    breakers: list[dict[str, Any]] = []
    ejected: list[dict[str, Any]] = []
    bounds = {float(b): i for i, b in enumerate(DURATION_BUCKETS_MS)}

    def edge(labels: Mapping[str, str]) -> dict[str, Any]:
        key = (
            labels.get("reporter", ""),
            labels.get("source_workload", "unknown"),
            labels.get("source_namespace", "unknown"),
            labels.get("destination_service", "unknown"),
        )
        found = edges.get(key)
        if found is None:
            found = edges[key] = {"requests": 0.0, "errors": 0.0, "buckets": [0.0] * (len(bounds) + 1)}
        return found

    for family in mesh.telemetry.registry.collect():
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "meshlib_requests_total":
                edge(labels)["requests"] += value
            elif name == "meshlib_request_errors_total":
                edge(labels)["errors"] += value
            elif name == "meshlib_request_duration_milliseconds_bucket":
                index = bounds.get(float(labels.get("le", "+Inf")), len(bounds))
                edge(labels)["buckets"][index] += value
            elif name == "meshlib_circuit_breaker_state" and labels.get("state") != "closed" and value > 0:
                breakers.append(_destination(labels, state=labels.get("state", ""), count=int(value)))
            elif name == "meshlib_outlier_ejected_endpoints" and value > 0:
                ejected.append(_destination(labels, ejected=int(value)))
    certs = mesh.certificates
    return {
        "at": time.time(),
        "snapshot": mesh.version,
        "certificate": (
            None
            if certs is None
            else {"identity": str(certs.identity), "not_after": certs.issued.not_after, "generation": certs.generation}
        ),
        "edges": [
            {"reporter": k[0], "source": k[1], "source_namespace": k[2], "destination": k[3], **v}
            for k, v in sorted(edges.items())[:_MAX_EDGES]
        ],
        "breakers": breakers,
        "ejected": ejected,
    }


def _destination(labels: Mapping[str, str], **more: Any) -> dict[str, Any]:
    return {
        "source": labels.get("source_workload", ""),
        "destination": labels.get("destination_service", ""),
        "subset": labels.get("destination_subset", ""),
        **more,
    }


def quantile(q: float, buckets: list[float]) -> float | None:
    """``histogram_quantile`` over cumulative bucket counts (Istio's bounds in milliseconds, then +Inf).

    Linear interpolation inside the bucket the rank falls in; the highest finite bound
    when it falls in +Inf; None with no observations.
    """
    total = buckets[-1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(DURATION_BUCKETS_MS, buckets, strict=False):
        if count >= rank:
            if count == lower_count:
                return float(bound)
            return lower_bound + (float(bound) - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = float(bound), count
    return float(DURATION_BUCKETS_MS[-1])


@dataclass
class _Report:
    received: float
    data: dict[str, Any]


class Reports:
    """The last reports of every data plane streaming from this replica, and the rates made from them."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._reports: dict[str, deque[_Report]] = {}

    def add(self, node: str, data: dict[str, Any], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        kept = self._reports.setdefault(node, deque())
        kept.append(_Report(now, data))
        while len(kept) > 2 and now - kept[1].received >= self.window:
            kept.popleft()

    def latest(self, node: str) -> dict[str, Any] | None:
        kept = self._reports.get(node)
        return kept[-1].data if kept else None

    def age(self, node: str, now: float | None = None) -> float | None:
        kept = self._reports.get(node)
        if not kept:
            return None
        return (time.monotonic() if now is None else now) - kept[-1].received

    def forget_stale(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for node in [n for n, kept in self._reports.items() if now - kept[-1].received > KEEP_FOR]:
            del self._reports[node]

    def edges(self, now: float | None = None) -> list[dict[str, Any]]:
        """RED per edge (source workload -> destination service), over the last ``window`` seconds.

        Both ends of a request may report it; an edge counts its source's reports when
        the source reported it (a meshed client), else its destination's (a client
        outside the mesh, seen only by the server).
        """
        self.forget_stale(now)
        sums: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        for kept in self._reports.values():
            newest = kept[-1]
            base = next(
                (r for r in kept if r is not newest and newest.received - r.received <= self.window * 1.5), None
            )
            seconds = newest.received - base.received if base is not None else 0.0
            before = {_key(e): e for e in (base.data.get("edges") or ())} if base is not None else {}
            for e in newest.data.get("edges") or ():
                key = _key(e)
                old = before.get(key)
                total = sums.setdefault(
                    key,
                    {"requests": 0.0, "errors": 0.0, "delta": 0.0, "delta_errors": 0.0, "rps": None, "buckets": []},
                )
                total["requests"] += float(e.get("requests", 0))
                total["errors"] += float(e.get("errors", 0))
                if old is None or seconds <= 0 or float(old.get("requests", 0)) > float(e.get("requests", 0)):
                    continue  # no baseline yet (or the counters restarted): totals only
                total["delta"] += float(e.get("requests", 0)) - float(old.get("requests", 0))
                total["delta_errors"] += float(e.get("errors", 0)) - float(old.get("errors", 0))
                total["rps"] = (total["rps"] or 0.0) + (
                    float(e.get("requests", 0)) - float(old.get("requests", 0))
                ) / seconds
                diff = [
                    float(a) - float(b) for a, b in zip(e.get("buckets") or (), old.get("buckets") or (), strict=False)
                ]
                total["buckets"] = [a + b for a, b in zip(total["buckets"], diff, strict=False)] or diff
        seen_by_source = {(k[1], k[2], k[3]) for k in sums if k[0] == "source"}
        out = []
        for (reporter, source, namespace, destination), t in sorted(sums.items()):
            if reporter != "source" and (source, namespace, destination) in seen_by_source:
                continue
            out.append(
                {
                    "source": source,
                    "source_namespace": namespace,
                    "destination": destination,
                    "reporter": reporter,
                    "requests": t["requests"],
                    "errors": t["errors"],
                    "rps": t["rps"],
                    "success_rate": 1.0 - t["delta_errors"] / t["delta"] if t["delta"] > 0 else None,
                    "p50_ms": quantile(0.5, t["buckets"]),
                    "p99_ms": quantile(0.99, t["buckets"]),
                }
            )
        return out

    def nodes(self) -> Iterable[str]:
        return list(self._reports)


def _key(edge: Mapping[str, Any]) -> tuple[str, str, str, str]:
    return (
        str(edge.get("reporter", "")),
        str(edge.get("source", "unknown")),
        str(edge.get("source_namespace", "unknown")),
        str(edge.get("destination", "unknown")),
    )
