"""Figures people look at: the freeze per UNet block. matplotlib with the Agg backend, written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .io import atomic_write_bytes


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
