"""A speed/fidelity front as geometry and as a picture: the points no other point beats,
and the PNG that numbers every point and keys the numbers below the plot. The collecting of
points from result files, and the command, are :mod:`app.bench.pareto`'s."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from app.bench.models import mode_name
from app.timing import dtype_name

# (speedup, top-1 agreement) a config must reach at least.
TARGETS: tuple[tuple[float, float], ...] = ((2.0, 0.80), (2.2, 0.85))

P = TypeVar("P", bound=Sequence[Any])


class ParetoPoint(NamedTuple):
    speedup: float
    agreement: float  # top-1 agreement with dense, a fraction in [0, 1]
    label: str
    ci95: tuple[float, float] | None = None  # the agreement's interval, where pooled


def pareto_front(points: Iterable[P]) -> list[P]:
    """The points no other point beats on both ``p[0]`` and ``p[1]`` (both maximised).

    A point is dropped if another is at least as good on both and better on one; of exact
    duplicates one is kept. Returned by ascending ``p[0]`` (so descending ``p[1]``), the
    order a step line is drawn in.
    """
    front: list[P] = []
    best_y = float("-inf")
    for p in sorted(points, key=lambda p: (-p[0], -p[1])):
        if p[1] > best_y:
            front.append(p)
            best_y = p[1]
    return front[::-1]


def keyed_points(points: Sequence[P], front: Sequence[P]) -> list[tuple[P, bool]]:
    """Every point but dense, by speed then agreement, and whether it is on ``front``: the
    plot numbers them and keys the numbers below it, since neighbouring points (several runs
    of one config often share one speed) would print their labels over each other."""
    on_front = set(front)
    return [
        (p, p in on_front) for p in sorted(points, key=lambda p: (p[0], p[1])) if p[2] != "dense"
    ]


def draw_front(
    points: Sequence[ParetoPoint],
    missing: Sequence[str],
    out_png: Path,
    *,
    device: str,
    arch: str,
    dtype: str,
    batch: int,
    compiled: bool,
    cuda_graphs: bool,
    targets: Sequence[tuple[float, float]] = TARGETS,
    overlay: Sequence[ParetoPoint] = (),
) -> Path:
    """The front's PNG from points already collected (by :mod:`app.bench.pareto`);
    ``overlay``: the same configs in another mode (compiled + graphs), drawn as a second
    front over the first."""
    if len(points) == 1:
        raise ValueError(
            f"no config has both a speed row ({arch}, {dtype}, batch {batch}, "
            f"compiled={compiled}) and fidelity; fidelity lacks: {missing}"
        )
    front = pareto_front(points)
    keyed = keyed_points(points, front)
    key = [
        f"{i}: {p.label}  {p.speedup:.2f}x, {100 * p.agreement:.1f}%"
        + (f" [{100 * p.ci95[0]:.1f}, {100 * p.ci95[1]:.1f}]" if p.ci95 else "")
        + ("  (front)" if on_front else "")
        for i, (p, on_front) in enumerate(keyed, 1)
    ]
    if missing:
        key.append("no fidelity yet: " + ", ".join(missing))
    key_height = 0.15 * len(key) + 0.1  # inches: a line of 7-pt text per entry

    fig = Figure(figsize=(9, 6 + key_height), layout="constrained")
    ax, key_ax = fig.subplots(2, 1, height_ratios=(6, key_height))
    x_max = max(max(p.speedup for p in points), *(t[0] for t in targets)) * 1.25  # room for labels
    lowest = min(p.ci95[0] if p.ci95 else p.agreement for p in points)
    y_min = min(lowest, *(t[1] for t in targets)) * 100 - 3
    ax.set_xlim(min(0.9, min(p.speedup for p in points) - 0.1), x_max)
    ax.set_ylim(y_min, 101)

    for (speedup, agreement), color in zip(targets, ("tab:orange", "tab:red"), strict=False):
        ax.plot(
            [speedup, speedup, x_max],
            [101, 100 * agreement, 100 * agreement],
            linestyle="--",
            color=color,
            label=f"target {speedup:.1f}x / {100 * agreement:.0f}%",
        )
    ax.scatter([p.speedup for p in points], [100 * p.agreement for p in points], color="tab:blue")
    if overlay:
        _draw_overlay(ax, overlay)
    for p in points:
        if p.ci95:
            ax.vlines(p.speedup, 100 * p.ci95[0], 100 * p.ci95[1], color="tab:blue", alpha=0.4)
    _step_front(ax, front, color="tab:green", label="Pareto front")
    for p in front:
        if p.label == "dense":
            ax.annotate("dense", (p.speedup, 100), textcoords="offset points", xytext=(5, 4))
    for i, (p, on_front) in enumerate(keyed, 1):
        ax.annotate(
            str(i),
            (p.speedup, 100 * p.agreement),
            textcoords="offset points",
            xytext=(5, 3) if on_front else (-4, -11),
            fontsize=8 if on_front else 7,
            color="tab:green" if on_front else "0.35",
            fontweight="bold" if on_front else "normal",
        )
    mode = mode_name(compiled, cuda_graphs)
    ax.set_title(f"{arch}, {dtype_name(dtype)}, batch {batch}, {mode}\n{device}")
    ax.set_xlabel("throughput speedup vs dense (same run)")
    ax.set_ylabel("top-1 agreement with dense (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    key_ax.axis("off")
    key_ax.text(0, 1, "\n".join(key), va="top", fontsize=7, transform=key_ax.transAxes)

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    return out_png


def _step_front(ax: Axes, front: Sequence[ParetoPoint], **style: Any) -> None:
    """A front as a step line through its points (agreement in %)."""
    ax.step([p.speedup for p in front], [100 * p.agreement for p in front], where="pre", **style)


def _draw_overlay(ax: Axes, overlay: Sequence[ParetoPoint]) -> None:
    """The overlay's points (crosses) and its own front (dotted), each front point labelled
    with its speed-up, so the two modes of one config read side by side."""
    ax.scatter(
        [p.speedup for p in overlay],
        [100 * p.agreement for p in overlay],
        marker="x",
        color="tab:purple",
    )
    front = pareto_front(overlay)
    _step_front(ax, front, color="tab:purple", linestyle=":", label="front compiled + CUDA graphs")
    for p in front:
        ax.annotate(
            f"{p.speedup:.2f}x",
            (p.speedup, 100 * p.agreement),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=7,
            color="tab:purple",
        )
