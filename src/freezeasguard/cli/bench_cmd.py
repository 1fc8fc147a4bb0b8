"""`freezeasguard bench`: the benchmark grid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import _fail, _offline, app


@app.command()
def bench(
    out: Annotated[Path, typer.Option("--out", "-o", help="Work directory (cells are cached here).")] = Path("runs/bench"),
    profile: Annotated[str, typer.Option(help="quick or full.")] = "quick",
    scenario: Annotated[list[str] | None, typer.Option(help="Restrict to these scenarios (repeat).")] = None,
    method: Annotated[list[str] | None, typer.Option(help="Restrict to these methods (repeat).")] = None,
    seed: Annotated[list[int] | None, typer.Option(help="Restrict to these seeds (repeat).")] = None,
    ratio: Annotated[list[float] | None, typer.Option(help="Freeze ratios instead of the profile's (repeat).")] = None,
    finetune_steps: Annotated[int | None, typer.Option(help="User fine-tuning steps instead of the profile's.")] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="Compute nothing: report the cached cells and list the missing ones.")] = False,
    finetune_lr: Annotated[float | None, typer.Option(help="User fine-tuning learning rate instead of the profile's.")] = None,
) -> None:
    """Scenarios x methods x ratios x seeds; resumable; writes results.md, results.json and tradeoff.png."""
    _offline()
    import dataclasses
    import sys

    from ..bench import PROFILES, run_bench

    if profile not in PROFILES:
        raise _fail(ValueError(f"--profile must be one of {sorted(PROFILES)}"))
    p = PROFILES[profile]
    p = dataclasses.replace(p, scenarios=scenario or p.scenarios, methods=method or p.methods, seeds=seed or p.seeds,
                            ratios=ratio or p.ratios, finetune_steps=finetune_steps or p.finetune_steps,
                            finetune_lr=finetune_lr or p.finetune_lr)
    try:
        run_bench(out, p, command="freezeasguard " + " ".join(sys.argv[1:]),
                  report_only=report_only)
    except (ValueError, OSError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"wrote {out / 'results.md'}")
