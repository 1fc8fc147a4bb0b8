"""Figures people look at: the freeze per UNet block. matplotlib with the Agg backend, written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..configs import RATIO_BY_DEFAULT
from .files import atomic_write_bytes


def axes_grid(n_rows: int, n_cols: int, size: tuple[float, float]) -> Any:
    """(pyplot, figure, axes[row][col]) on the file-only backend, each panel `size` inches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size[0] * n_cols, size[1] * n_rows), squeeze=False)
    return plt, fig, axes


def goal_panel(ax: Any, *, goal_x: float, goal_y: float, x_max: float, xlabel: str, title: str,
               goal_label: str = "goal") -> None:
    """A mitigation-against-legal-impact panel: the goal box (impact <= goal_x, mitigation >= goal_y) shaded,
    the zero lines, the limits and the labels."""
    lo_x = min(-0.1, ax.get_xlim()[0])
    ax.fill_between([lo_x, goal_x], goal_y, 1.0, color="green", alpha=0.12, label=goal_label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlim(lo_x, max(x_max, ax.get_xlim()[1]))
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mitigation (higher is better)")
    ax.set_title(title)


def plot_blocks(rows: list[dict[str, Any]], path: str | Path, *, title: str) -> Path:
    """Horizontal bars per block: frozen fraction by tensor count and by parameter count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["block"] for r in rows]
    by_count = [r["frozen"] / r["tensors"] for r in rows]
    by_params = [r["frozen_parameters"] / max(r["parameters"], 1) for r in rows]
    height = max(2.5, 0.35 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(7, height))
    y = range(len(rows))
    ax.barh([i - 0.2 for i in y], by_count, height=0.4, label="tensors frozen", color="#3b6ea8")
    ax.barh([i + 0.2 for i in y], by_params, height=0.4, label="parameters frozen", color="#e08a3c")
    ax.set_yticks(list(y), [f"{lab} ({r['frozen']}/{r['tensors']})" for lab, r in zip(labels, rows)])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction frozen")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_guard(guard: Any, path: str | Path, *, depth: int = 2) -> Path:
    s = guard.summary()
    title = (f"guard ({s['method']}): {s['frozen_tensors']}/{s['total_tensors']} tensors "
             f"({s['ratio_by_count']:.1%}), {s['ratio_by_params']:.1%} of parameters")
    return plot_blocks(guard.per_block(depth), path, title=title)


def plot_learning(history: list[dict[str, Any]], path: str | Path, *, ratio_by: str = RATIO_BY_DEFAULT) -> Path:
    """Guard learning per mask step: hard and soft ratio and polarisation (by tensors and by parameters) with
    the temperature; below, the illegal and legal losses of the mask batches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["mask_step"] for h in history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for key, colour in (("hard_ratio", "#3b6ea8"), ("soft_ratio", "#7a9cc6"), ("polarisation", "#e08a3c")):
        for unit, style in (("tensors", "-"), ("params", "--")):
            values = [h.get(f"{key}_{unit}") for h in history]
            if any(v is not None for v in values):
                top.plot(steps, values, style, color=colour, label=f"{key.replace('_', ' ')} ({unit})")
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel("share")
    temps = [h.get("temperature") for h in history]
    if any(t is not None for t in temps):
        right = top.twinx()
        right.plot(steps, temps, ":", color="#555555", label="temperature")
        right.set_ylabel("temperature T")
        right.legend(loc="center right", fontsize=7)
    top.legend(loc="upper left", fontsize=7, ncol=2)
    top.set_title(f"guard learning (ratio counted by {ratio_by})", fontsize=10)
    for key, colour in (("illegal_loss", "#c0392b"), ("legal_loss", "#27ae60")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            bottom.plot(steps, values, color=colour, label=key.replace("_", " "))
    skipped = [h["mask_step"] for h in history if h.get("skipped")]
    for x in skipped:
        bottom.axvline(x, color="#999999", linewidth=0.5)
    bottom.set_xlabel("mask step" + (f" (grey: {len(skipped)} skipped, non-finite gradient)" if skipped else ""))
    bottom.set_ylabel("mask-batch loss")
    if bottom.lines:
        bottom.legend(fontsize=7)
    return _save(fig, path)
