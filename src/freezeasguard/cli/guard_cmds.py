"""Guard commands: make, combine, diff, inspect, verify."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from . import ModelOpt, _fail, _offline, app, load_model_arg

guard_app = typer.Typer(help="Make, combine and compare guard files.", no_args_is_help=True)
app.add_typer(guard_app, name="guard")

GuardOpt = Annotated[Path, typer.Option("--guard", "-g", help="Guard JSON file.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Guard JSON file to write.")]


def _load_guard(path: Path):  # type: ignore[no-untyped-def]
    from ..guard import Guard, GuardError

    try:
        return Guard.load(path)
    except GuardError as exc:
        raise _fail(exc) from exc


def _unet(model: str):  # type: ignore[no-untyped-def]
    return load_model_arg(model).unet


def _report(guard, out: Path) -> None:  # type: ignore[no-untyped-def]
    s = guard.summary()
    typer.echo(f"wrote {out}: {s['frozen_tensors']}/{s['total_tensors']} tensors frozen "
               f"({s['ratio_by_count']:.2%} by count, {s['ratio_by_params']:.2%} by parameters)")


@guard_app.command("random")
def guard_random(
    ratio: Annotated[float, typer.Option(help="Fraction to freeze.")],
    out: OutOpt,
    model: ModelOpt = "embedded",
    seed: Annotated[int, typer.Option(help="Seed of the random choice.")] = 0,
    by: Annotated[str, typer.Option(help="'count' (exact tensor count) or 'params' (parameter budget).")] = "count",
) -> None:
    """Freeze a random set of UNet tensors (the random-freezing baseline)."""
    _offline()
    from ..guard import Guard

    try:
        guard = Guard.random(_unet(model), ratio, seed=seed, by=by, provenance={"model": model})
    except ValueError as exc:
        raise _fail(exc) from exc
    guard.save(out)
    _report(guard, out)


@guard_app.command("names")
def guard_names(
    names: Annotated[Path, typer.Argument(help="Text file, one UNet tensor name per line (or a JSON list).")],
    out: OutOpt,
    model: ModelOpt = "embedded",
) -> None:
    """Freeze exactly the listed UNet tensors."""
    _offline()
    from ..guard import Guard, GuardError

    text = names.read_text()
    listed = json.loads(text) if text.lstrip().startswith("[") else [x.strip() for x in text.splitlines() if x.strip()]
    try:
        guard = Guard.from_names(_unet(model), listed, provenance={"model": model, "names_file": str(names)})
    except GuardError as exc:
        raise _fail(exc) from exc
    guard.save(out)
    _report(guard, out)


@guard_app.command("combine")
def guard_combine(
    a: Annotated[Path, typer.Argument(help="First guard.")],
    b: Annotated[Path, typer.Argument(help="Second guard.")],
    out: OutOpt,
    op: Annotated[str, typer.Option(help="'union' or 'intersection'.")] = "union",
) -> None:
    """Union or intersection of two guards of the same model."""
    from ..guard import GuardError

    ga, gb = _load_guard(a), _load_guard(b)
    if op not in ("union", "intersection"):
        raise _fail(ValueError("--op must be 'union' or 'intersection'"))
    try:
        guard = ga.union(gb) if op == "union" else ga.intersection(gb)
    except GuardError as exc:
        raise _fail(exc) from exc
    guard.save(out)
    _report(guard, out)


@guard_app.command("diff")
def guard_diff(
    a: Annotated[Path, typer.Argument(help="First guard.")],
    b: Annotated[Path, typer.Argument(help="Second guard.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Tensors frozen by only one of two guards, and by both."""
    from ..guard import GuardError

    try:
        d = _load_guard(a).diff(_load_guard(b))
    except GuardError as exc:
        raise _fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    typer.echo(f"both: {len(d['both'])}   only {a}: {len(d['only_self'])}   only {b}: {len(d['only_other'])}")
    if len(set(d["allow_text_encoder"])) > 1:
        typer.echo(f"allow_text_encoder: {a}: {d['allow_text_encoder'][0]}   {b}: {d['allow_text_encoder'][1]}")
    for n in d["only_self"]:
        typer.echo(f"- {n}")
    for n in d["only_other"]:
        typer.echo(f"+ {n}")


@app.command()
def inspect(
    guard: Annotated[Path, typer.Argument(help="Guard JSON file.")],
    png: Annotated[Path | None, typer.Option(help="PNG of the freeze per block (default: next to the guard).")] = None,
    depth: Annotated[int, typer.Option(help="2: per block; 3: per block part (attentions, resnets, ...).")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the freeze per UNet block and write it as a PNG."""
    from ..plots import plot_guard

    g = _load_guard(guard)
    rows = g.per_block(depth)
    png = png or guard.with_suffix(".blocks.png")
    plot_guard(g, png, depth=depth)
    if as_json:
        typer.echo(json.dumps({"summary": g.summary(), "blocks": rows, "png": str(png)}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    s = g.summary()
    table = Table(title=f"{guard}: {s['method']}, {s['frozen_tensors']}/{s['total_tensors']} tensors "
                        f"({s['ratio_by_count']:.1%}), {s['ratio_by_params']:.1%} of parameters")
    for col in ("block", "frozen tensors", "frozen parameters"):
        table.add_column(col, justify="left" if col == "block" else "right")
    for r in rows:
        table.add_row(r["block"], f"{r['frozen']}/{r['tensors']}",
                      f"{r['frozen_parameters']:,}/{r['parameters']:,} ({r['frozen_parameters'] / max(r['parameters'], 1):.0%})")
    Console().print(table)
    typer.echo(f"wrote {png}")


@app.command()
def verify(
    derivative: Annotated[Path, typer.Argument(help="Fine-tuned model dir, UNet folder or .safetensors, or a LoRA file.")],
    guard: GuardOpt,
    base: Annotated[Path | None, typer.Option(help="Base model, for elementwise tolerance checks.")] = None,
    tolerance: Annotated[float | None, typer.Option(help="Accept frozen tensors within this relative error "
                                                          "(lower-precision or re-quantised derivatives).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Audit a derivative against a guard: exit 0 when compliant, 1 with the offending tensors otherwise."""
    from ..audit import AuditError, verify as run_verify

    g = _load_guard(guard)
    try:
        report = run_verify(derivative, g, base=base, tolerance=tolerance)
    except AuditError as exc:
        raise _fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        verdict = "COMPLIANT" if report.compliant else "NOT COMPLIANT"
        typer.echo(f"{verdict}: {derivative} ({report.kind}) against {guard}")
        for f in report.violations:
            typer.echo(f"  {f.status:>18}  {f.name}  {f.detail}")
        for f in report.findings:
            if f.ok and f.status != "ok":
                typer.echo(f"  {f.status:>18}  {f.name}  {f.detail}")
        for note in report.notes:
            typer.echo(f"  note: {note}")
        if report.compliant:
            typer.echo(f"  {report.describe()}")
    raise typer.Exit(code=0 if report.compliant else 1)
