"""Guard commands: make, combine, diff, inspect, verify."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..configs import RATIO_BY_DEFAULT
from . import _offline, app, frozen_shares, load_model_arg
from .options import (
    DebugOpt,
    GuardOpt,
    JsonOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    RatioByOpt,
    RatioOpt,
    SeedOpt,
    ToleranceOpt,
    choice,
)

guard_app = typer.Typer(help="Make, combine and compare guard files. Each writes OUT/guard.json.",
                        no_args_is_help=True)
app.add_typer(guard_app, name="guard")

GuardArg = Annotated[Path, typer.Argument(help="Guard JSON file.", dir_okay=False)]
GUARD_FILE = "guard.json"


def _load_guard(path: Path):  # type: ignore[no-untyped-def]
    from ..guard import Guard

    return Guard.load(path)


def _model(model: str):  # type: ignore[no-untyped-def]
    return load_model_arg(model)


def _target(out: Path, overwrite: bool) -> Path:
    """OUT/guard.json, refused when it exists (unless --overwrite) before any model is loaded."""
    path = out / GUARD_FILE
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: choose another --out or pass --overwrite")
    return path


def _begin(out: Path, overwrite: bool):  # type: ignore[no-untyped-def]
    """Checks OUT before any model is loaded; returns the Guard class (imported late: --help stays fast)."""
    _target(out, overwrite)
    _offline()
    from ..guard import Guard

    return Guard


def _save(guard, out: Path, overwrite: bool) -> None:  # type: ignore[no-untyped-def]
    path = _target(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    guard.save(path)
    typer.echo(f"wrote {path}: {frozen_shares(guard)}")


@guard_app.command("random")
def guard_random(
    ratio: RatioOpt = 0.3,
    ratio_by: RatioByOpt = RATIO_BY_DEFAULT,
    out: OutOpt = Path("runs/guard"),
    model: ModelOpt = "embedded",
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Freeze a random set of UNet tensors (the random-freezing baseline)."""
    Guard = _begin(out, overwrite)
    loaded = _model(model)
    guard = Guard.random(loaded.unet, ratio, seed=seed, ratio_by=ratio_by,
                         provenance={"model": model}).with_text_encoders(loaded)
    _save(guard, out, overwrite)


@guard_app.command("top")
def guard_top(
    scores: Annotated[Path, typer.Argument(help="JSON object: UNet tensor name -> score (higher: frozen first).",
                                           dir_okay=False)],
    ratio: RatioOpt = 0.3,
    ratio_by: RatioByOpt = RATIO_BY_DEFAULT,
    out: OutOpt = Path("runs/guard"),
    model: ModelOpt = "embedded",
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Freeze the highest-scoring UNet tensors (any importance score computed elsewhere)."""
    Guard = _begin(out, overwrite)
    from ..utils.files import read_json

    data = read_json(scores, "scores file")
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise ValueError(f"{scores}: expected a JSON object of tensor name -> number")
    loaded = _model(model)
    guard = Guard.from_scores(loaded.unet, data, ratio, ratio_by=ratio_by,
                              provenance={"model": model, "scores_file": str(scores)}).with_text_encoders(loaded)
    _save(guard, out, overwrite)


@guard_app.command("names")
def guard_names(
    names: Annotated[Path, typer.Argument(help="Text file, one UNet tensor name per line (or a JSON list).",
                                          dir_okay=False)],
    out: OutOpt = Path("runs/guard"),
    model: ModelOpt = "embedded",
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Freeze exactly the listed UNet tensors."""
    Guard = _begin(out, overwrite)
    from ..utils.files import read_bounded

    text = read_bounded(names, "names file").decode("utf-8")
    listed = json.loads(text) if text.lstrip().startswith("[") else [x.strip() for x in text.splitlines() if x.strip()]
    loaded = _model(model)
    guard = Guard.from_names(loaded.unet, listed,
                             provenance={"model": model, "names_file": str(names)}).with_text_encoders(loaded)
    _save(guard, out, overwrite)


@guard_app.command("combine")
def guard_combine(
    a: GuardArg,
    b: GuardArg,
    out: OutOpt = Path("runs/guard"),
    op: Annotated[str, typer.Option(help="'union' or 'intersection'.",
                                    callback=choice("union", "intersection"))] = "union",
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Union or intersection of two guards of the same model."""
    _target(out, overwrite)
    ga, gb = _load_guard(a), _load_guard(b)
    _save(ga.union(gb) if op == "union" else ga.intersection(gb), out, overwrite)


@guard_app.command("diff")
def guard_diff(
    a: GuardArg,
    b: GuardArg,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Tensors frozen by only one of two guards, and by both."""
    d = _load_guard(a).diff(_load_guard(b))
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
    guard: GuardArg,
    png: Annotated[Path | None, typer.Option(help="PNG of the freeze per block (default: next to the guard).",
                                             dir_okay=False)] = None,
    depth: Annotated[int, typer.Option(help="2: per block; 3: per block part (attentions, resnets, ...).",
                                       min=1)] = 2,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Print the freeze per UNet block and write it as a PNG."""
    from ..utils.plots import plot_guard

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
    table = Table(title=f"{guard}: {s['method']}, {frozen_shares(g)}")
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
    base: Annotated[Path | None, typer.Option(help="Base model directory, for elementwise --tolerance checks.")] = None,
    tolerance: ToleranceOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Audit a derivative against a guard: exit 0 compliant, 1 not (tensors listed), 2 unreadable input."""
    from ..audit import printable
    from ..audit import verify as run_verify
    from ..utils.files import file_sha256

    g = _load_guard(guard)
    report = run_verify(derivative, g, base=base, tolerance=tolerance)
    digest = file_sha256(guard)  # compare it with the SHA-256 the publisher published beside the model
    if as_json:
        typer.echo(json.dumps({**report.to_dict(), "guard_sha256": digest}, indent=2))
    else:
        verdict = "COMPLIANT" if report.compliant else "NOT COMPLIANT"
        typer.echo(f"{verdict}: {printable(derivative)} ({report.kind}) against {printable(guard)}: {frozen_shares(g)}")
        typer.echo(f"  guard sha256: {digest} (compare with the publisher's)")
        for f in report.violations:
            typer.echo(f"  {f.status:>18}  {printable(f.name)}  {printable(f.detail)}")
        for f in report.findings:
            if f.ok and f.status != "ok":
                typer.echo(f"  {f.status:>18}  {printable(f.name)}  {printable(f.detail)}")
        for note in report.notes:
            typer.echo(f"  note: {printable(note)}")
        if report.compliant:
            typer.echo(f"  {report.describe()}")
    raise typer.Exit(code=0 if report.compliant else 1)
