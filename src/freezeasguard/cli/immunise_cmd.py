"""`freezeasguard immunise`: release a model whose frozen tensors hold immunised values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from . import _offline, app, frozen_shares, load_model_arg
from .learn_cmd import PositiveFloat, check_data_options, publisher_data
from .options import (
    ConfigOpt,
    DebugOpt,
    GuardOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    PrintConfigOpt,
    SeedOpt,
    choice,
    config_from,
    print_config,
)

# option parameter -> ImmuniseConfig field. Defaults are ImmuniseConfig()'s (a test checks), written out so that
# --help does not import torch.
IMMUNISE_FIELDS = (("immunise_steps", "steps"), ("immunise_lr", "lr"), ("text_subspace", "text_subspace"),
                   ("legal_weight", "legal_weight"), ("max_change", "max_change"), ("attack_lr", "attack_lr"))
PRODUCTS = ("model", "guard.json", "immunise.json")


@app.command()
def immunise(
    ctx: typer.Context,
    guard: GuardOpt,
    out: OutOpt = Path("runs/immunise"),
    model: ModelOpt = "embedded",
    scenario: Annotated[str | None, typer.Option(help="Embedded scenario for the data: figures or artstyle.")] = None,
    illegal: Annotated[Path | None, typer.Option(help="Image folder of the illegal domain (publisher's samples).")] = None,
    legal: Annotated[Path | None, typer.Option(help="Image folder of the legal domain (publisher's samples).")] = None,
    caption_column: Annotated[str, typer.Option(help="Caption column of the folders' metadata.")] = "text",
    add: Annotated[str, typer.Option(
        help="Tensors frozen beside the guard's: 'xattn' (every cross-attention projection), 'kv' (every "
             "cross-attention key/value weight) or 'none' (the guard's set as it is).",
        callback=choice("none", "kv", "xattn"))] = "xattn",
    immunise_steps: Annotated[int, typer.Option(
        help="The publisher's immunising steps (ImmuniseConfig.steps; the simulated attacker takes one per step). "
             "Not a user's --steps.", min=1)] = 200,
    immunise_lr: Annotated[float, typer.Option(
        help="Adam step size of the frozen values (ImmuniseConfig.lr). Not a user's --lr; the simulated "
             "attacker's rate is --attack-lr.", **PositiveFloat)] = 0.05,
    text_subspace: Annotated[int, typer.Option(
        help="Text-embedding directions the K/V values may change along (0: every frozen tensor moves freely).",
        min=0)] = 8,
    legal_weight: Annotated[float, typer.Option(help="Weight of L_legal in the defender's objective.")] = 1.0,
    max_change: Annotated[float, typer.Option(help="Trust region: |new - released| <= this x |released| per tensor.",
                                              **PositiveFloat)] = 1.0,
    attack_lr: Annotated[float, typer.Option(help="The simulated attacker's AdamW rate.", **PositiveFloat)] = 1e-4,
    seed: SeedOpt = 0,
    config: ConfigOpt = None,
    show_config: PrintConfigOpt = False,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Release MODEL with the guard's frozen tensors (plus --add) holding immunised values.

    The values are optimised so that fine-tuning the trainable rest on the illegal samples fails while legal
    fine-tuning works (docs/method.md); only what the guard freezes changes, so a user of the guarded
    fine-tuning path cannot undo it. Writes OUT/model (the model to release), OUT/guard.json (its guard: the
    fingerprint is of the new values, so release the two together) and OUT/immunise.json (the run's history).
    Interrupted, the same command continues from its last checkpoint (OUT/immunise-checkpoint, every 25 steps)."""
    _offline()
    from ..guard import Guard
    from ..protections.immunise import ImmuniseConfig, immunised_release
    from ..utils.files import atomic_write_json, claim_output_dir

    cfg = config_from(ctx, config, IMMUNISE_FIELDS, ImmuniseConfig)
    if show_config:
        print_config(cfg)
        return
    check_data_options(scenario, illegal, legal)
    g = Guard.load(guard)
    identity = {"guard": g.digest(), "model": str(model), "scenario": scenario, "illegal": str(illegal),
                "legal": str(legal), "add": add, "seed": seed, "config": cfg.to_dict()}
    with claim_output_dir(out, "immunise", identity, PRODUCTS, overwrite=overwrite):
        if (out / "guard.json").exists() and (out / "model" / "model_index.json").exists():
            typer.echo(f"{out}: already complete (guard.json and model/); nothing to do")
            return
        m = load_model_arg(model)
        ill, leg = publisher_data(scenario, illegal, legal, caption_column, m.resolution, seed)
        new, info = immunised_release(m, g, ill, leg, cfg, add=add, seed=seed, output_dir=out)
        # the model first: a guard.json next to a missing or old model would be a release that fails its audit
        m.save_pretrained(out / "model", overwrite=True)
        new.save(out / "guard.json")
        record = json.loads((out / "immunise.json").read_text())
        atomic_write_json(out / "immunise.json", {**record, "model": str(model), "guard": str(guard), "add": add})
    typer.echo(f"wrote {out / 'model'} and {out / 'guard.json'}: {frozen_shares(new)}; "
               f"{info['moved_tensors']} tensor(s) carry new values")
