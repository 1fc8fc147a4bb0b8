"""`freezeasguard bench`: the benchmark grid, and `freezeasguard bench-report`: a report over several runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import _fail, _offline, app
from .options import DebugOpt, OutOpt, OverwriteOpt


@app.command()
def bench(
    out: OutOpt = Path("runs/bench"),
    profile: Annotated[str, typer.Option(help="quick, full, attacks (the battery on figures) or artstyle (the same on the style scenario); see docs/benchmark.md: the starting point that the options below change.")] = "quick",
    config: Annotated[Path | None, typer.Option("--config", help="A profile as JSON (every field of BenchProfile; see --print-config), checked in full before any work; replaces --profile.", exists=True, dir_okay=False)] = None,
    scenario: Annotated[list[str] | None, typer.Option(help="Replace the profile's scenarios (repeat): figures, artstyle, figures-scratch, artstyle-scratch.")] = None,
    method: Annotated[list[str] | None, typer.Option(help="Replace the profile's protections (repeat): NAME, A+B (composed left to right) or NAME@RATIO.")] = None,
    seed: Annotated[list[int] | None, typer.Option(help="Replace the profile's seeds (repeat).")] = None,
    ratio: Annotated[list[float] | None, typer.Option(help="Replace the profile's freeze ratios (repeat).")] = None,
    steps: Annotated[int | None, typer.Option(help="The illegal user's fine-tuning steps (attack budget) instead of the profile's.", min=1)] = None,
    legal_steps: Annotated[int | None, typer.Option(help="The legal user's fine-tuning steps instead of the profile's.", min=1)] = None,
    lr: Annotated[float | None, typer.Option(help="The users' learning rate instead of the profile's.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="The users' batch size instead of the profile's.", min=1)] = None,
    n_samples: Annotated[int | None, typer.Option(help="Samples per domain at the budgets instead of the profile's.", min=1)] = None,
    curve: Annotated[list[str] | None, typer.Option(help="Replace the profile's curve cells (repeat): METHOD or METHOD@RATIO.")] = None,
    skip_void: Annotated[bool | None, typer.Option("--skip-void/--no-skip-void", help="Skip the method cells of a setting whose validity checks failed (known after its base cell and full fine-tuning). Default: the profile's (on).")] = None,
    reuse: Annotated[list[Path] | None, typer.Option("--reuse", help="Another bench output directory, or a results.json (such as docs/attacks-results.json), whose cells this run copies where it lacks them and their settings are this profile's (repeat).", exists=True)] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="Compute nothing: report the cached cells and list the missing ones.")] = False,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved profile as JSON (a --config file) and exit.")] = False,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Scenarios x protections x ratios x seeds; resumable; writes results.md, results.json, frontier.png, curves.png."""
    _offline()
    import sys

    from ..bench.profiles import PROFILES, BenchProfile, profile_json, replace_profile
    from ..bench.runner import run_bench

    try:
        if config is not None:
            start = BenchProfile.load(config)
        elif profile in PROFILES:
            start = PROFILES[profile]
        else:
            raise ValueError(f"--profile must be one of {sorted(PROFILES)}")
        p = replace_profile(start, scenarios=scenario, methods=method, seeds=seed, ratios=ratio, steps=steps,
                            legal_steps=legal_steps, lr=lr, batch_size=batch_size, n_samples=n_samples,
                            curve_cells=curve, skip_void=skip_void)
        p.validate()
    except (ValueError, TypeError, OSError) as exc:
        raise _fail(exc) from exc
    if print_config:
        typer.echo(profile_json(p))
        return
    try:
        run_bench(out, p, command="freezeasguard " + " ".join(sys.argv[1:]), report_only=report_only,
                  overwrite=overwrite, reuse_from=reuse or ())
    except (ValueError, OSError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"wrote {out / 'results.md'}")


@app.command("bench-report")
def bench_report(
    sources: Annotated[list[str], typer.Argument(help="Bench output directories or results.json files; PATH=LABEL reports that run's protections under LABEL (variants side by side).")],
    out: OutOpt = Path("runs/report"),
    config: Annotated[Path | None, typer.Option("--config", help="The profile whose names and budgets the report states (default: the first source's).", exists=True, dir_okay=False)] = None,
    battery_record: Annotated[Path | None, typer.Option("--battery-record", help="Also write the battery's worst cases as the package ships them for the demo (src/freezeasguard/bench/recorded-battery.json).", dir_okay=False)] = None,
    debug: DebugOpt = False,
) -> None:
    """One report (results.md, results.json, frontier.png, curves.png) over the cells of several bench runs,
    computing nothing. A cell found in two sources with different settings is refused."""
    _offline()
    import sys

    from ..bench.profiles import BenchProfile
    from ..bench.runner import report_runs

    try:
        for spec in sources:
            path = spec if Path(spec).exists() else spec.rpartition("=")[0]
            if not Path(path).exists():
                raise ValueError(f"{spec}: no such file or directory")
        report_runs(list(sources), out, profile=BenchProfile.load(config) if config else None,
                    command="freezeasguard " + " ".join(sys.argv[1:]))
        if battery_record is not None:
            import json

            from ..bench.battery import recorded_worst_cases
            from ..utils.files import atomic_write_json, read_json

            results = read_json(out / "results.json", "bench results")
            atomic_write_json(battery_record, recorded_worst_cases(results, " + ".join(sources)))
            typer.echo(f"wrote {battery_record}: {json.dumps(results['summary']['battery']['best_worst_case'])}")
    except (ValueError, OSError, KeyError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"wrote {out / 'results.md'}")
