"""`freezeasguard demo`: the project's main job on the embedded default."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from . import _fail, _offline, app


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Work directory; the report goes to OUT/report.")] = Path("runs/demo"),
    scenario: Annotated[str, typer.Option(help="figures or artstyle.")] = "figures",
    ratio: Annotated[float, typer.Option(help="Freeze ratio of the learned guard.")] = 0.3,
    seed: Annotated[int, typer.Option(help="Seed of splits, training and sampling.")] = 0,
    n_samples: Annotated[int, typer.Option(help="Samples per model and domain.")] = 200,
) -> None:
    """Learn a guard, fine-tune as an illegal and a legal user with and without it, evaluate, and write a
    report. Rerun the same command to resume an interrupted demo."""
    _offline()
    from rich.console import Console
    from rich.table import Table

    from ..demo import DemoConfig, run_demo, table_rows

    t0 = time.perf_counter()
    try:
        result = run_demo(out, DemoConfig(scenario=scenario, ratio=ratio, seed=seed, n_samples=n_samples))
    except (ValueError, OSError) as exc:
        raise _fail(exc) from exc
    table = Table(title=f"freezeasguard demo ({scenario}, ratio {ratio}, seed {seed})")
    for col in ("model", "domain", "recognition [95% CI]", "mean prob", "FD"):
        table.add_column(col)
    for row in table_rows(result):
        table.add_row(*row)
    console = Console()
    console.print(table)
    d = result["derived"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    console.print(f"mitigation {pct(d['mitigation'])}; legal impact near {pct(d['legal_impact_near'])}, "
                  f"far {pct(d['legal_impact_far'])}; benchmark valid: {'yes' if result['valid'] else 'NO'}")
    console.print(f"report: {out / 'report' / 'report.md'}   elapsed {time.perf_counter() - t0:.0f} s")
