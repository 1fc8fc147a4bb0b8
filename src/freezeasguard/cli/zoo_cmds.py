"""`freezeasguard zoo`: the embedded default's recipe, shipping and integrity check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import _offline, app
from .options import ConfigOpt, DebugOpt, OutOpt, OverwriteOpt, PrintConfigOpt, SeedOpt, config_from, print_config

zoo_app = typer.Typer(help="The embedded default: rerun its recipe, ship it, check it.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("pretrain")
def pretrain(
    ctx: typer.Context,
    out: OutOpt = Path("runs/zoo"),
    seed: SeedOpt = 0,
    config: ConfigOpt = None,
    show_config: PrintConfigOpt = False,
    recipe: Annotated[str, typer.Option(help="The named recipe to start from (embedded, embedded-style); "
                                             "--config overrides its fields.")] = "embedded",
    ship_to: Annotated[Path | None, typer.Option("--ship-to", help="Write the finished model, recogniser, "
                                                                   "manifest and card here.")] = None,
    ship: Annotated[bool, typer.Option(help="Ship into the installed package's zoo/<recipe>.")] = False,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train the VAE, the base UNet + text encoder and the recogniser, then evaluate them.

    --recipe names a shipped base's recipe (a recipe that shares another base's codec copies its VAE,
    tokenizer and recogniser instead of training them); --config takes ZooRecipe fields. Writes checkpoints,
    stage outputs and record.json in OUT. Resumable: rerun the same command after an interruption."""
    _offline()
    import json

    from ..zoo import base_root
    from ..zoo.recipe import RECIPES, ZooRecipe, run
    from ..zoo.ship import ship as do_ship

    if recipe not in RECIPES:
        raise typer.BadParameter(f"unknown recipe {recipe!r}: use one of {sorted(RECIPES)}", param_hint="--recipe")
    r = config_from(ctx, config, [("seed", "seed")], ZooRecipe, base=RECIPES[recipe])
    if show_config:
        print_config(r)
        return
    record = run(out, r, overwrite=overwrite)
    typer.echo(json.dumps(record["stages"], indent=2, default=str))
    dest = ship_to or (base_root(recipe) if ship else None)
    if dest is not None:
        do_ship(out, dest)
        typer.echo(f"shipped to {dest}")


@zoo_app.command("ship")
def ship_cmd(
    work: Annotated[Path, typer.Argument(help="A finished `zoo pretrain` work directory.")],
    dest: Annotated[Path | None, typer.Option(help="Destination (default: the package's zoo/embedded).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Copy a finished run into the package (float16 weights, manifest with hashes, model card)."""
    from ..zoo import EMBEDDED_DIR
    from ..zoo.ship import ship as do_ship

    out = do_ship(work, dest or EMBEDDED_DIR)
    typer.echo(f"shipped to {out}")


@zoo_app.command("check")
def check(
    base: Annotated[str, typer.Argument(help="The shipped base to check (embedded, embedded-style).")] = "embedded",
    debug: DebugOpt = False,
) -> None:
    """Verify the shipped files against the hashes in their manifest: exit 0 when all match, 1 otherwise."""
    from ..errors import ModelError
    from ..zoo import base_dir, base_root, check_files

    try:
        base_dir(base)  # shipped at all?
        root = base_root(base)
        bad = check_files(root)
    except ModelError as e:
        raise typer.BadParameter(str(e), param_hint="BASE") from e
    if bad:
        typer.echo(f"{len(bad)} shipped file(s) differ from the manifest: {bad}")
        raise typer.Exit(code=1)
    typer.echo(f"{root}: all files match the manifest")
