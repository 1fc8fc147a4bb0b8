"""`freezeasguard zoo`: the embedded default's recipe, shipping and integrity check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from . import _fail, _offline, app

zoo_app = typer.Typer(help="The embedded default: rerun its recipe, ship it, check it.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("pretrain")
def pretrain(
    work: Annotated[Path, typer.Option(help="Work directory (checkpoints, stage outputs, record.json).")] = Path("runs/zoo"),
    recipe: Annotated[Path | None, typer.Option(help="ZooRecipe fields as JSON (default: the shipped recipe).")] = None,
    ship_to: Annotated[Path | None, typer.Option("--ship-to", help="Write the finished model, recogniser, "
                                                                   "manifest and card here.")] = None,
    ship: Annotated[bool, typer.Option(help="Ship into the installed package's zoo/embedded.")] = False,
) -> None:
    """Train the VAE, the base UNet + text encoder and the recogniser, then evaluate them. Resumable: rerun
    the same command after an interruption."""
    _offline()
    from ..zoo import EMBEDDED_DIR
    from ..zoo.recipe import ZooRecipe, run
    from ..zoo.ship import ship as do_ship

    try:
        r = ZooRecipe.from_dict(json.loads(recipe.read_text())) if recipe else ZooRecipe()
        record = run(work, r)
    except ValueError as exc:
        raise _fail(exc) from exc
    typer.echo(json.dumps(record["stages"], indent=2, default=str))
    dest = ship_to or (EMBEDDED_DIR if ship else None)
    if dest is not None:
        do_ship(work, dest)
        typer.echo(f"shipped to {dest}")


@zoo_app.command("ship")
def ship_cmd(
    work: Annotated[Path, typer.Argument(help="A finished `zoo pretrain` work directory.")],
    dest: Annotated[Path | None, typer.Option(help="Destination (default: the package's zoo/embedded).")] = None,
) -> None:
    """Copy a finished run into the package (float16 weights, manifest with hashes, model card)."""
    from ..zoo import EMBEDDED_DIR
    from ..zoo.ship import ship as do_ship

    try:
        out = do_ship(work, dest or EMBEDDED_DIR)
    except (ValueError, OSError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"shipped to {out}")


@zoo_app.command("check")
def check() -> None:
    """Verify the shipped files against the hashes in their manifest."""
    from ..errors import ModelError
    from ..zoo import EMBEDDED_DIR, check_files

    try:
        bad = check_files()
    except ModelError as exc:
        raise _fail(exc) from exc
    if bad:
        typer.echo(f"{len(bad)} shipped file(s) differ from the manifest: {bad}")
        raise typer.Exit(code=1)
    typer.echo(f"{EMBEDDED_DIR}: all files match the manifest")
