"""`freezeasguard learn`: learn a guard from illegal and legal samples."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..configs import RATIO_BY_DEFAULT
from . import _offline, app, frozen_shares, load_model_arg
from .options import (
    BatchSizeOpt,
    ConfigOpt,
    DebugOpt,
    LrOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    PrintConfigOpt,
    RatioByOpt,
    RatioOpt,
    SeedOpt,
    choice,
    config_from,
    finite_positive,
    print_config,
)

# option parameter -> LearnConfig field it sets. The options' defaults are LearnConfig()'s (a test checks),
# written out here because importing the config would import torch and slow down --help.
LEARN_FIELDS = (
    ("ratio", "ratio"), ("ratio_by", "ratio_by"), ("seed", "seed"), ("temperature", "temperature"),
    ("mask_steps", "mask_steps"), ("mask_every", "mask_every"), ("mask_batch", "mask_batch"),
    ("mask_lr", "mask_lr"), ("mask_optimizer", "mask_optimizer"), ("ratio_control", "ratio_control"),
    ("penalty", "penalty"), ("illegal_weight", "illegal_weight"), ("legal_weight", "legal_weight"),
    ("lr", "user.learning_rate"), ("batch_size", "user.batch_size"),
    ("warm_steps", "warm_start.max_steps"), ("warm_lr", "warm_start.learning_rate"),
    ("warm_batch_size", "warm_start.batch_size"),
)

PositiveFloat = dict(callback=finite_positive)


def scenario_data(name: str, resolution: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """The publisher's illegal and legal datasets of an embedded scenario (legal = legal-near + legal-far)."""
    from ..bench import emoji

    sc = emoji.scenario(name, seed)
    illegal = emoji.dataset(sc.items("illegal", "publisher"), resolution, preload=True)
    legal_items = sc.items("legal_near", "publisher") + sc.items("legal_far", "publisher")
    legal = emoji.dataset(legal_items, resolution, preload=True)
    return illegal, legal, sc


def check_data_options(scenario: str | None, illegal: Path | None, legal: Path | None) -> None:
    """The publisher's samples come from an embedded scenario or from two image folders, not both."""
    if scenario is not None and (illegal or legal):
        raise ValueError("give either --scenario or --illegal/--legal, not both")
    if scenario is None and not (illegal and legal):
        raise ValueError("give --scenario, or both --illegal and --legal image folders")


def publisher_data(scenario: str | None, illegal: Path | None, legal: Path | None, caption_column: str,
                   resolution: int, seed: int):  # type: ignore[no-untyped-def]
    """(illegal, legal) datasets from the options checked by `check_data_options`."""
    from ..data import ImageCaptionFolder, ImageTransform

    if scenario is not None:
        ill, leg, _ = scenario_data(scenario, resolution, seed)
        return ill, leg
    transform = ImageTransform(resolution)
    return (ImageCaptionFolder(illegal, transform, caption_column=caption_column),
            ImageCaptionFolder(legal, transform, caption_column=caption_column))


@app.command()
def learn(
    ctx: typer.Context,
    out: OutOpt = Path("runs/learn"),
    model: ModelOpt = "embedded",
    scenario: Annotated[str | None, typer.Option(help="Embedded scenario for the data: figures or artstyle.")] = None,
    illegal: Annotated[Path | None, typer.Option(help="Image folder of the illegal domain (publisher's samples).")] = None,
    legal: Annotated[Path | None, typer.Option(help="Image folder of the legal domain (publisher's samples).")] = None,
    caption_column: Annotated[str, typer.Option(help="Caption column of the folders' metadata.")] = "text",
    ratio: RatioOpt = 0.3,
    ratio_by: RatioByOpt = RATIO_BY_DEFAULT,
    seed: SeedOpt = 0,
    mask_steps: Annotated[int, typer.Option(help="Mask steps (the simulated user takes --mask-every steps "
                                                 "between two).", min=1)] = 60,
    mask_every: Annotated[int, typer.Option(help="Simulated-user steps between two mask steps (k).", min=1)] = 5,
    mask_batch: Annotated[int, typer.Option(help="Samples per mask step, half illegal and half legal.", min=2)] = 32,
    mask_lr: Annotated[float, typer.Option(help="Step size of the mask logits.", **PositiveFloat)] = 0.02,
    mask_optimizer: Annotated[str, typer.Option(
        help="'adam' (scale-free per logit), 'sgd' (the authors') or 'sgd-normalised' (SGD with the gradient "
             "divided by one scale fixed at the first mask step: magnitude-aware).",
        callback=choice("adam", "sgd", "sgd-normalised"))] = "adam",
    ratio_control: Annotated[str, typer.Option(
        help="'projection' (ours: shift the logits so the mean mask equals the ratio) or 'penalty' (the "
             "authors' c (ratio - mean m)^2, c = --penalty).", callback=choice("projection", "penalty"))] = "projection",
    penalty: Annotated[float, typer.Option(help="c of the authors' penalty (only with --ratio-control penalty).",
                                           **PositiveFloat)] = 5e3,
    temperature: Annotated[float, typer.Option(help="T of the soft mask sigmoid(x / T).", **PositiveFloat)] = 0.2,
    illegal_weight: Annotated[float, typer.Option(help="Weight of -L_illegal in the mask objective.")] = 1.0,
    legal_weight: Annotated[float, typer.Option(help="Weight of L_legal in the mask objective.")] = 1.0,
    lr: LrOpt = 1e-4,
    batch_size: BatchSizeOpt = 32,
    warm_steps: Annotated[int, typer.Option(help="Steps of the warm-start fine-tune theta_ft starts from.", min=1)] = 200,
    warm_lr: Annotated[float, typer.Option(help="Learning rate of the warm-start fine-tune (finite, > 0).",
                                           **PositiveFloat)] = 1e-4,
    warm_batch_size: Annotated[int, typer.Option(help="Micro-batch of the warm-start fine-tune.", min=1)] = 32,
    warm_start_model: Annotated[Path | None, typer.Option(help="Already fine-tuned model to start theta_ft from "
                                                                "(skips the warm-start fine-tune).")] = None,
    config: ConfigOpt = None,
    show_config: PrintConfigOpt = False,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Learn a guard (FreezeAsGuard's bilevel mask learning) from illegal and legal samples.

    The data: --scenario, or --illegal and --legal image folders. Writes OUT/guard.json, OUT/learn.json,
    OUT/mask.png and checkpoints; rerun the same command to resume.

    --lr and --batch-size are the simulated user's (the same user `finetune` defaults to); every other field
    of the configuration is in --config (see --print-config and docs/cli.md)."""
    _offline()
    from ..learn import LearnConfig, learn_guard
    from ..model import DiffusionModel

    cfg = config_from(ctx, config, LEARN_FIELDS, LearnConfig)
    if show_config:
        print_config(cfg)
        return
    check_data_options(scenario, illegal, legal)
    m = load_model_arg(model)
    ill, leg = publisher_data(scenario, illegal, legal, caption_column, m.resolution, cfg.seed)
    warm = DiffusionModel.from_pretrained(warm_start_model) if warm_start_model else None
    guard = learn_guard(m, ill, leg, cfg, output_dir=out, warm_start_model=warm,
                        provenance={"model": str(model), "scenario": scenario}, overwrite=overwrite)
    typer.echo(f"wrote {out / 'guard.json'}: {frozen_shares(guard)}; per block: {out / 'mask.png'}")
