"""Options shared by the commands: one name, one type, one help text for one thing.

A command takes a shared option by annotating a parameter with the alias below and giving its own default:

    def learn(model: ModelOpt = "embedded", out: OutOpt = Path("runs/learn"), lr: LrOpt = 1e-4, ...)

`tests/test_cli.py` walks the app and checks that every command listed for an option has it, under this
name, with this type and this help. Values are checked here (finite, in range) so that a bad number is a usage
error (exit 2) naming the option before any model is loaded.

Commands with a configuration dataclass take `--config FILE.json` (the dataclass's fields, nested as in
`--print-config`'s output) and `--print-config`; options given on the command line override the file, and
`config_from` merges the two.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from ..configs import RATIO_UNITS, merge_nested


# ----------------------------------------------------------------------------------------------- checks
def finite_positive(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number > 0, got {value}")
    return value


def finite_nonnegative(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"must be a finite number >= 0, got {value}")
    return value


def open_unit(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and 0.0 < value < 1.0):
        raise typer.BadParameter(f"must be strictly between 0 and 1, got {value}")
    return value


def choice(*allowed: str):  # type: ignore[no-untyped-def]
    """A callback accepting only these values (kept to plain str options: Enum/Literal support differs across
    typer versions)."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
        return value

    return check


DEBUG_ENV = "FREEZEASGUARD_DEBUG"
# Set by --debug's callback while a command's options are parsed, reset before each invocation (the app's
# group does both), so one CliRunner invocation's flag never leaks into the next.
_debug = {"on": False}


def debug_enabled() -> bool:
    return _debug["on"] or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _set_debug(value: bool) -> bool:
    _debug["on"] = bool(value)
    return value


def reset_debug() -> None:
    _debug["on"] = False


# ----------------------------------------------------------------------------------------------- options
ALL_COMMANDS = "*"
# The shared options: option -> the commands that take it (ALL_COMMANDS: every command). Each has one name,
# type, check and help wherever it appears (tests/test_cli.py walks the app), and docs/cli.md's table of
# shared options lists exactly these rows (tests/test_docs.py).
SHARED_OPTIONS: dict[str, set[str] | str] = {
    "--model": {"info", "sample", "finetune", "learn", "immunise", "guard random", "guard top", "guard names",
                "attack"},
    "--guard": {"finetune", "verify", "immunise", "attack"},
    "--out": {"finetune", "learn", "immunise", "guard random", "guard top", "guard names", "guard combine",
              "zoo pretrain", "demo", "bench", "bench-report", "attack", "make-fixture"},
    "--seed": {"sample", "tiny", "finetune", "learn", "immunise", "guard random", "zoo pretrain", "demo", "attack",
               "make-fixture"},
    "--steps": {"finetune", "demo"},
    "--lr": {"finetune", "learn", "demo"},
    "--batch-size": {"finetune", "learn", "demo"},
    "--ratio": {"learn", "guard random", "guard top", "demo"},
    "--ratio-by": {"learn", "guard random", "guard top", "demo"},
    "--config": {"finetune", "learn", "immunise", "zoo pretrain"},
    "--print-config": {"finetune", "learn", "immunise", "zoo pretrain"},
    "--overwrite": {"tiny", "guard random", "guard top", "guard names", "guard combine", "finetune", "learn",
                    "immunise", "demo", "bench", "zoo pretrain", "attack", "jobs download", "make-fixture"},
    "--json": {"info", "inspect", "verify", "guard diff", "jobs submit", "jobs status", "keys list"},
    "--debug": ALL_COMMANDS,
}
# Commands that take a shared option's name for something of another kind, and why. bench's --seed, --ratio,
# --steps, --lr and --batch-size replace the profile's values (lists for the first two; unset = the profile's),
# and bench's --config is a whole BenchProfile, which it also prints (--print-config) and runs from.
SHARED_EXCEPTIONS: dict[str, dict[str, str]] = {
    "bench": {opt: "replaces the profile's value (unset: the profile's)"
              for opt in ("--seed", "--ratio", "--steps", "--lr", "--batch-size", "--config", "--print-config")},
    "bench-report": {"--config": "the profile the report states"},
    # the service's commands: one model and guard for every job, and the service's own configuration file
    **{cmd: {"--model": "the model every job of the service fine-tunes", "--guard": "the guard every job runs under",
             "--config": "a ServiceConfig file"} for cmd in ("serve", "worker")},
    **{cmd: {"--config": "a ServiceConfig file"} for cmd in ("keys create", "keys revoke", "keys list")},
    # a job's hyperparameters on the client: unset means the publisher's defaults, checked by the server
    "jobs submit": {opt: "the job's value; unset: the publisher's default"
                    for opt in ("--seed", "--steps", "--lr", "--batch-size")},
    "jobs download": {"--out": "the folder the job's artefacts are written to"},  # its --overwrite is shared
}
RATIO_BY = RATIO_UNITS

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m",
    help="'embedded' (the shipped tiny default), 'embedded-style' (the shipped base that knows the OpenMoji "
         "style) or a Stable-Diffusion-format model directory (model_index.json, unet/, ...).")]
GuardOpt = Annotated[Path, typer.Option(
    "--guard", "-g", help="Guard JSON file (guard.json, as written by `learn` or `guard`).", dir_okay=False)]
MaybeGuardOpt = Annotated[Path | None, typer.Option(
    "--guard", "-g", help="Guard JSON file (guard.json, as written by `learn` or `guard`).", dir_okay=False)]
OutOpt = Annotated[Path, typer.Option(
    "--out", "-o", help="Output directory (created if missing); the command's help says what it writes there.",
    file_okay=False)]
StepsOpt = Annotated[int, typer.Option(help="Optimizer steps of the user's fine-tuning.", min=1)]
LrOpt = Annotated[float, typer.Option(help="Learning rate of the user's fine-tuning (finite, > 0).",
                                      callback=finite_positive)]
BatchSizeOpt = Annotated[int, typer.Option(help="Micro-batch of the user's fine-tuning, per process.", min=1)]
SeedOpt = Annotated[int, typer.Option(help="Seed of everything random in the run (data order, noise, choices); "
                                           "the same seed gives the same result.", min=0)]
RatioOpt = Annotated[float, typer.Option(help="Freeze ratio, strictly between 0 and 1 (see --ratio-by).",
                                         callback=open_unit)]
RatioByOpt = Annotated[str, typer.Option(
    help="What --ratio counts: 'params' (a share of the UNet's parameters, the default everywhere) or 'count' "
         "(a share of its tensors).", callback=choice(*RATIO_BY))]
ConfigOpt = Annotated[Path | None, typer.Option(
    help="JSON file of configuration fields, nested as --print-config prints them (docs/cli.md lists them); "
         "options given on the command line override it; an unknown field is an error.",
    exists=True, dir_okay=False)]
PrintConfigOpt = Annotated[bool, typer.Option(
    "--print-config", help="Print the configuration this command would run with (every field, as JSON for "
                           "--config) and exit without running.")]
DebugOpt = Annotated[bool, typer.Option(
    "--debug", help=f"Show the full traceback of an error (also: {DEBUG_ENV}=1).", callback=_set_debug)]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace what this command writes if it already exists.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON (machine-readable) instead of text.")]
ToleranceOpt = Annotated[float | None, typer.Option(
    help="Accept a frozen tensor that differs by at most this much: with --base, the largest elementwise "
         "difference relative to the base tensor's largest magnitude; without it, a relative distance estimated "
         "from the summary of the values the guard file records (weaker; each finding says how it was measured). "
         "Finite, >= 0; 0 means exact (the recorded digests), as without the option.",
    callback=finite_nonnegative)]


# ----------------------------------------------------------------------------------------------- config files
def read_config_file(path: Path | None) -> dict[str, Any]:
    """The JSON object in a --config file ({} without one); anything else is an error naming the file."""
    if path is None:
        return {}
    from ..utils.files import read_json

    data = read_json(path, "--config file")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a --config file must hold a JSON object of fields, got {type(data).__name__}")
    return data


def config_from(ctx: typer.Context, path: Path | None, fields: Iterable[tuple[str, str]], cls: Any,
                base: Any = None) -> Any:
    """The configuration a command runs with: `cls`'s defaults (or `base`, a `cls` instance such as a named
    recipe), then the --config file's fields, then the options given on the command line.

    Merged as nested dicts before `cls` is built, so a file or an option that sets one field of a nested
    config (`{"user": {"batch_size": 2}}`, `--lr`) keeps the other fields at `cls`'s defaults rather than at
    the nested class's own. `fields` pairs an option's parameter name with the field it sets
    ("user.learning_rate" when nested). An option left at its default does not override the file; its default
    equals `cls`'s (a test checks). An unknown field is an error naming the field and the file."""
    data = merge_nested((base if base is not None else cls()).to_dict(), read_config_file(path))
    for param, dotted in fields:
        source = ctx.get_parameter_source(param)
        if source is None or source.name == "DEFAULT":
            continue
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise ValueError(f"{path}: field {key!r} must be a JSON object")
            node = node[key]
        value = ctx.params[param]
        node[leaf] = list(value) if isinstance(value, tuple) else value
    try:
        return cls.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}" if path is not None else str(exc)) from exc


def print_config(cfg: Any) -> None:
    typer.echo(json.dumps(cfg.to_dict(), indent=2, default=list))


__all__ = [
    "BatchSizeOpt", "ConfigOpt", "DebugOpt", "GuardOpt", "JsonOpt", "LrOpt", "MaybeGuardOpt", "ModelOpt", "OutOpt",
    "OverwriteOpt", "PrintConfigOpt", "RATIO_BY", "RatioByOpt", "RatioOpt", "SeedOpt", "StepsOpt", "ToleranceOpt",
    "choice", "config_from", "debug_enabled", "finite_nonnegative", "finite_positive", "open_unit", "print_config", "read_config_file", "reset_debug",
]
