"""`freezeasguard make-fixture`: random-initialised models with the exact configurations of SD 1.5, SD 2.1
and SDXL, for running the tools at the shapes publishers release."""

from __future__ import annotations

from typing import Annotated

import typer

from ..zoo.fixtures import ARCHITECTURES
from . import _fail, _offline, app
from .options import DebugOpt, OutOpt, OverwriteOpt, SeedOpt, choice


@app.command("make-fixture")
def make_fixture(
    arch: Annotated[str, typer.Option(
        help="Architecture: sd15 (Stable Diffusion 1.5), sd21 (2.1, 768 px, v-prediction) or sdxl (XL base 1.0).",
        callback=choice(*ARCHITECTURES))],
    out: OutOpt,
    width_divisor: Annotated[int, typer.Option(
        help="Divide every width (channels, hidden sizes, projections) by this and keep the rest of the structure "
             "and every tensor name; 1 (the default) is the exact size. 8 fits all three architectures.", min=1)] = 1,
    resolution: Annotated[int, typer.Option(
        help="Image side in pixels the UNet's and VAE's sample sizes are set for; 0 (the default): the "
             "architecture's own (512, 768 or 1024).")] = 0,
    dtype: Annotated[str, typer.Option(help="Weight dtype: float32 (as the hub's main files), float16 or bfloat16.",
                                       callback=choice("float32", "float16", "bfloat16"))] = "float32",
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a random-initialised model directory with the exact component configurations of a released model.

    UNet, VAE, text encoder(s), tokenizer(s) (built offline: CLIP's vocabulary size and special tokens),
    scheduler and model_index.json as the hub's snapshot holds them, in its layout, weights in safetensors;
    README.md in OUT says where each configuration was read. Random weights: for shapes, names and timings,
    not for images. Nothing is downloaded."""
    _offline()
    from ..errors import FreezeAsGuardError
    from ..zoo.fixtures import write_fixture

    try:
        path = write_fixture(out, arch, width_divisor=width_divisor, resolution=resolution or None, seed=seed,
                             dtype=dtype, overwrite=overwrite)
    except (FreezeAsGuardError, ValueError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"wrote {path}")
