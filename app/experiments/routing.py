"""A/B routing: which variant serves a /classify request that names no model.

A request maps to a point ``u`` in [0, 1): random, or — when the client sends the sticky
header — a SHA-256 of the header value, which is stable across requests, processes and
restarts (Python's ``hash`` is salted per process), so one client keeps one variant.
``u`` falls into one variant's slice of the cumulative weights. If that variant is not
ready, where ``u`` lies inside its slice picks among the ready ones: clients of healthy
variants keep theirs, and the unready variant's traffic is spread over the others in
proportion to their weights (re-using ``u`` itself would send it all to a neighbour).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from bisect import bisect_right
from collections.abc import Callable, Iterable
from itertools import accumulate

from app.serving.metrics import Metrics

log = logging.getLogger(__name__)


class RoutingConfigError(ValueError):
    """The A/B or shadow settings name models that are not served: refused at start."""


def sticky_point(value: str) -> float:
    """A stable, uniform point in [0, 1) for a client identifier."""
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick(weights: dict[str, float], u: float) -> tuple[str, float]:
    """The variant whose slice of the cumulative weights holds ``u`` (some weight > 0), and
    where in that slice ``u`` lies, rescaled to [0, 1): a fresh uniform point, independent
    of the variant picked, for a second draw when that variant cannot serve."""
    names = [n for n, w in weights.items() if w > 0]
    if not names:
        raise ValueError(f"no positive weight to pick from: {weights}")
    bounds = list(accumulate(weights[n] for n in names))
    x = u * bounds[-1]
    index = min(bisect_right(bounds, x), len(names) - 1)
    start = bounds[index - 1] if index else 0.0
    within = (x - start) / (bounds[index] - start)
    return names[index], min(max(within, 0.0), math.nextafter(1.0, 0.0))


def check_known(what: str, names: Iterable[str], served: Iterable[str]) -> None:
    unknown = sorted(set(names) - set(served))
    if unknown:
        raise RoutingConfigError(
            f"{what} names models that are not served: {unknown}; served: {sorted(served)}"
        )


class AbRouter:
    def __init__(
        self,
        weights: dict[str, float],
        sticky_header: str | None,
        metrics: Metrics,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not any(w > 0 for w in weights.values()):
            raise RoutingConfigError(f"A/B weights are empty or all zero: {weights}")
        self.weights, self.sticky_header = dict(weights), sticky_header
        self._metrics, self._rng = metrics, rng
        self._skipping: set[str] = set()
        for name in self.weights:
            metrics.ab_assignments.labels(name)
            metrics.ab_skipped.labels(name)

    def choose(self, sticky_value: str | None, is_ready: Callable[[str], bool]) -> str | None:
        """The variant for one request; None when no weighted variant is ready."""
        u = sticky_point(sticky_value) if sticky_value is not None else self._rng()
        first, within = pick(self.weights, u)
        if is_ready(first):
            self._skipping.discard(first)
            self._metrics.ab_assignments.labels(first).inc()
            return first
        self._metrics.ab_skipped.labels(first).inc()
        if first not in self._skipping:  # log a variant's outage once, not per request
            self._skipping.add(first)
            log.warning("A/B variant %s is not ready: its traffic goes to the others", first)
        ready = {n: w for n, w in self.weights.items() if n != first and w > 0 and is_ready(n)}
        if not ready:
            return None
        chosen, _ = pick(ready, within)
        self._metrics.ab_assignments.labels(chosen).inc()
        return chosen
