"""`freezeasguard bench`: the benchmark grid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import _fail, _offline, app
from .options import DebugOpt, OutOpt, OverwriteOpt


@app.command()
def bench(
    out: OutOpt = Path("runs/bench"),
    profile: Annotated[str, typer.Option(help="quick or full.")] = "quick",
    scenario: Annotated[list[str] | None, typer.Option(help="Replace the profile's scenarios (repeat): figures, artstyle, figures-scratch, artstyle-scratch.")] = None,
    method: Annotated[list[str] | None, typer.Option(help="Replace the profile's methods (repeat).")] = None,
    seed: Annotated[list[int] | None, typer.Option(help="Replace the profile's seeds (repeat).")] = None,
    ratio: Annotated[list[float] | None, typer.Option(help="Replace the profile's freeze ratios (repeat).")] = None,
    steps: Annotated[int | None, typer.Option(help="The illegal user's fine-tuning steps (attack budget) instead of the profile's.", min=1)] = None,
    legal_steps: Annotated[int | None, typer.Option(help="The legal user's fine-tuning steps instead of the profile's.", min=1)] = None,
    lr: Annotated[float | None, typer.Option(help="The users' learning rate instead of the profile's.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="The users' batch size instead of the profile's.", min=1)] = None,
    n_samples: Annotated[int | None, typer.Option(help="Samples per domain at the budgets instead of the profile's.", min=1)] = None,
    curve: Annotated[list[str] | None, typer.Option(help="Replace the profile's curve cells (repeat): METHOD or METHOD@RATIO.")] = None,
    skip_void: Annotated[bool, typer.Option("--skip-void/--no-skip-void", help="Skip the method cells of a setting whose validity checks failed (known after its base cell and full fine-tuning).")] = True,
    report_only: Annotated[bool, typer.Option("--report-only", help="Compute nothing: report the cached cells and list the missing ones.")] = False,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Scenarios x methods x ratios x seeds; resumable; writes results.md, results.json, frontier.png, curves.png."""
    _offline()
    import sys

    from ..bench import PROFILES, replace_profile, run_bench

    if profile not in PROFILES:
        raise _fail(ValueError(f"--profile must be one of {sorted(PROFILES)}"))
    p = replace_profile(PROFILES[profile], scenarios=scenario, methods=method, seeds=seed, ratios=ratio, steps=steps,
                        legal_steps=legal_steps, lr=lr, batch_size=batch_size, n_samples=n_samples, curve_cells=curve,
                        skip_void=skip_void)
    try:
        run_bench(out, p, command="freezeasguard " + " ".join(sys.argv[1:]), report_only=report_only,
                  overwrite=overwrite)
    except (ValueError, OSError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"wrote {out / 'results.md'}")
