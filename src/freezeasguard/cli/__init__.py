"""`freezeasguard` command line: a thin layer over the Python API.

Heavy libraries (torch, diffusers, transformers) are imported inside the commands, so `--help` answers at
once; `import diffusers` alone costs seconds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from .options import DebugOpt, JsonOpt, ModelOpt, OverwriteOpt, SeedOpt, debug_enabled, reset_debug

# Exit codes, the same for every command: 0 done (verify: compliant); 1 a negative verdict (verify: not
# compliant, zoo check: files differ); 2 bad input, named in the message; 3 a bug in freezeasguard.
EXIT_USAGE = 2
EXIT_INTERNAL = 3


def _is_user_error(exc: BaseException) -> bool:
    from ..errors import FreezeAsGuardError

    # ValueError covers the configs' own checks and bad JSON; OSError a missing, unreadable or unwritable path.
    return isinstance(exc, (FreezeAsGuardError, ValueError, OSError))


# Exceptions that are the CLI's own control flow (exit codes, usage errors): found through typer's public names
# because recent typer releases vendor click instead of using the installed one.
_CLI_FLOW = (typer.Exit, typer.Abort) + tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _Commands(TyperGroup):
    """Every command runs inside this: an exception becomes one line on stderr and an exit code, not a
    traceback, unless --debug (or FREEZEASGUARD_DEBUG=1) asks for it."""

    def invoke(self, ctx: Any) -> Any:
        reset_debug()  # --debug's callback sets it again while the command's options are parsed
        try:
            return super().invoke(ctx)
        except _CLI_FLOW:
            raise
        except Exception as exc:
            if debug_enabled():
                raise
            if _is_user_error(exc):
                typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
                raise typer.Exit(EXIT_USAGE) from exc
            typer.secho(f"internal error: {type(exc).__name__}: {exc}\n(a bug in freezeasguard: rerun with --debug "
                        "for the traceback and report it)", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_INTERNAL) from exc


app = typer.Typer(
    name="freezeasguard",
    help="Release a text-to-image diffusion model with a guard of frozen UNet tensors (FreezeAsGuard), "
    "fine-tune under it, and audit derivatives. Exit codes: 0 done (verify: compliant), 1 verify: not "
    "compliant, 2 bad input (the message names it), 3 internal error.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Commands,
)


def _offline() -> None:
    # Never reach for a hub: every model comes from local disk.
    _show_progress()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _show_progress() -> None:
    """The library reports its stages through `logging` (logger 'freezeasguard'); a command shows them."""
    import logging

    logger = logging.getLogger("freezeasguard")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=EXIT_USAGE)


def frozen_shares(guard) -> str:  # type: ignore[no-untyped-def]
    """'N/M UNet tensors frozen (x% of tensors, y% of parameters)': every command shows both shares."""
    s = guard.summary()
    return (f"{s['frozen_tensors']}/{s['total_tensors']} UNet tensors frozen ({s['ratio_by_count']:.1%} of tensors, "
            f"{s['ratio_by_params']:.1%} of parameters)")


def load_model_arg(model: str | Path):  # type: ignore[no-untyped-def]
    """The model a command names: a shipped base ('embedded', 'embedded-style') or a Stable-Diffusion-format
    directory."""
    _offline()
    from ..errors import FreezeAsGuardError
    from ..model import DiffusionModel
    from ..zoo import BASES, load_base

    try:
        if str(model) in BASES:
            return load_base(str(model))
        return DiffusionModel.from_pretrained(Path(model))
    except FreezeAsGuardError as exc:
        raise _fail(exc) from exc


@app.command()
def info(
    model: ModelOpt = "embedded",
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Components, tensor and parameter counts of a model directory."""
    described = load_model_arg(model).describe()
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model}  ({described['space']} space, {described['resolution']} px, "
                  f"{described['prediction_type']}, {described['scheduler']})")
    table.add_column("component")
    table.add_column("class")
    table.add_column("tensors", justify="right")
    table.add_column("parameters", justify="right")
    for name, comp in described["components"].items():
        if comp is None:
            table.add_row(name, "-", "-", "-")
        else:
            table.add_row(name, comp["class"], str(comp["tensors"]), f"{comp['parameters']:,}")
    for key in ("tokenizer", "tokenizer_2"):
        tok = described.get(key)
        if tok is not None:
            table.add_row(key, tok["class"], "-", f"vocab {tok['vocab_size']:,}, max length {tok['max_length']}")
    Console().print(table)


@app.command()
def sample(
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt; repeat for several rows.")],
    model: ModelOpt = "embedded",
    png: Annotated[Path, typer.Option(help="PNG grid to write (one row per prompt).", dir_okay=False)] = Path("grid.png"),
    n: Annotated[int, typer.Option("--n", help="Images per prompt.", min=1)] = 4,
    seed: SeedOpt = 0,
    sampling_steps: Annotated[int, typer.Option(help="Denoising steps of the sampler.", min=1)] = 25,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (1 = none).")] = 3.0,
    sampler: Annotated[str, typer.Option(help="ddim, ddpm, euler or dpm.")] = "ddim",
    scale: Annotated[int, typer.Option(help="Upscale factor for viewing small images (nearest).", min=1)] = 4,
    debug: DebugOpt = False,
) -> None:
    """Sample images and write them as a PNG grid; image i depends only on (seed, i, prompt)."""
    from ..errors import FreezeAsGuardError
    from ..utils.images import save_grid

    m = load_model_arg(model)
    try:
        prompts = [p for p in prompt for _ in range(n)]
        images = m.sample(prompts, seed=seed, num_inference_steps=sampling_steps, guidance_scale=guidance, sampler=sampler)
    except (FreezeAsGuardError, ValueError) as exc:
        raise _fail(exc) from exc
    save_grid(images, png, nrow=n, scale=scale)
    typer.echo(f"wrote {png} ({len(prompt)} x {n} images, {m.resolution} px, seed {seed})")


@app.command()
def tiny(
    out: Annotated[Path, typer.Argument(help="Directory to create.")],
    latent: Annotated[bool, typer.Option(help="Latent model with a small AutoencoderKL (else pixel space).")] = False,
    resolution: Annotated[int, typer.Option(help="Image side in pixels.")] = 16,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a tiny randomly initialised Stable-Diffusion-format model (for tests and trying the tools)."""
    _offline()
    from ..errors import FreezeAsGuardError
    from ..tiny import TinySpec, write_tiny_model

    try:
        path = write_tiny_model(out, TinySpec(latent=latent, resolution=resolution), seed=seed, overwrite=overwrite)
    except (FreezeAsGuardError, ValueError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"wrote {path}")


def main() -> None:
    try:
        app()
    finally:
        if "torch.distributed" in sys.modules:  # a command run under torchrun (finetune); --help never imports torch
            from ..training import release_process_group

            release_process_group()


# Commands defined in sibling modules register themselves on `app` (their heavy imports stay inside them).
from . import (  # noqa: E402,F401  (each module registers its commands)
    attack_cmd,
    bench_cmd,
    demo_cmd,
    finetune_cmd,
    fixture_cmd,
    guard_cmds,
    immunise_cmd,
    jobs_cmd,
    learn_cmd,
    serve_cmd,
    zoo_cmds,
)

__all__ = ["app", "main"]
