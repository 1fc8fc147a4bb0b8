"""`freezeasguard demo`: the project's main job on the embedded default."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ..configs import RATIO_BY_DEFAULT
from . import _fail, _offline, app
from .options import BatchSizeOpt, DebugOpt, LrOpt, OutOpt, OverwriteOpt, RatioByOpt, RatioOpt, SeedOpt, StepsOpt


@app.command()
def demo(
    out: OutOpt = Path("runs/demo"),
    scenario: Annotated[str, typer.Option(help="figures or artstyle (relearn form), or figures-scratch / artstyle-scratch.")] = "figures",
    ratio: RatioOpt = 0.3,
    ratio_by: RatioByOpt = RATIO_BY_DEFAULT,
    seed: SeedOpt = 0,
    steps: StepsOpt = 400,
    legal_steps: Annotated[int, typer.Option(help="Optimizer steps of the legal user's fine-tuning (--steps is the "
                                                  "illegal user's attack budget).", min=1)] = 400,
    lr: LrOpt = 1e-4,
    batch_size: BatchSizeOpt = 32,
    n_samples: Annotated[int, typer.Option(help="Samples per model and domain.", min=1)] = 100,
    release: Annotated[bool, typer.Option("--release/--no-release", help="Measure the project's strongest release (all cross-attention frozen with token-selective immunised values) beside the paper's guard, against the same users: an immunisation and one illegal and one legal fine-tune more, about 4 of the demo's 15 minutes. With --no-release its figures are only quoted from the battery record shipped with the package, labelled as recorded.")] = True,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Teach the base the protected figures, unlearn them, guard the release, let an illegal and a legal user
    fine-tune it with and without the guard, evaluate, and write a report. Rerun the same command to resume."""
    _offline()
    from rich.console import Console
    from rich.table import Table

    from ..bench.demo import DemoConfig, run_demo, summary_lines, table_rows
    from ..bench.profiles import STRONGEST_RELEASE

    t0 = time.perf_counter()
    try:
        cfg = DemoConfig(scenario=scenario, ratio=ratio, ratio_by=ratio_by, seed=seed, steps=steps, legal_steps=legal_steps, lr=lr,
                         batch_size=batch_size, n_samples=n_samples, release=STRONGEST_RELEASE if release else None)
        result = run_demo(out, cfg, overwrite=overwrite)
    except (ValueError, OSError) as exc:
        raise _fail(exc) from exc
    table = Table(title=f"freezeasguard demo ({scenario}, ratio {ratio}, seed {seed})")
    for col in ("model", "domain", "recognition [95% CI]", "mean prob", "FD"):
        table.add_column(col)
    for row in table_rows(result):
        table.add_row(*row)
    console = Console()
    console.print(table)
    for line in summary_lines(result, cfg):
        console.print(line, markup=False, highlight=False)
    console.print(f"report: {out / 'report' / 'report.md'}   elapsed {time.perf_counter() - t0:.0f} s")
