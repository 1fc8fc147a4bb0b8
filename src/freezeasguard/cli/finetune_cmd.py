"""`freezeasguard finetune`: guarded fine-tuning from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import _offline, app, frozen_shares, load_model_arg
from .options import (
    BatchSizeOpt,
    ConfigOpt,
    DebugOpt,
    LrOpt,
    MaybeGuardOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    PrintConfigOpt,
    SeedOpt,
    StepsOpt,
    choice,
    config_from,
    print_config,
)

# option parameter -> FinetuneConfig field it sets. The options' defaults are FinetuneConfig()'s (a test checks),
# written out here because importing the config would import torch and slow down --help.
FINETUNE_FIELDS = (
    ("steps", "train.max_steps"), ("batch_size", "train.batch_size"),
    ("accumulation", "train.gradient_accumulation"), ("lr", "train.learning_rate"), ("seed", "train.seed"),
    ("mixed_precision", "train.mixed_precision"), ("checkpoint_every", "train.checkpoint_every"),
    ("method", "method"), ("lora_rank", "lora_rank"), ("lora_target", "lora_targets"),
    ("skip_frozen_targets", "skip_frozen_targets"),
)


@app.command()
def finetune(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="Image folder with metadata.jsonl/.csv captions or .txt sidecars.")],
    out: OutOpt = Path("runs/finetune"),
    model: ModelOpt = "embedded",
    guard: MaybeGuardOpt = None,
    method: Annotated[str, typer.Option(help="'full' or 'lora'.", callback=choice("full", "lora"))] = "full",
    steps: StepsOpt = 400,
    batch_size: BatchSizeOpt = 32,
    accumulation: Annotated[int, typer.Option(help="Gradient accumulation steps.", min=1)] = 1,
    lr: LrOpt = 1e-4,
    seed: SeedOpt = 0,
    mixed_precision: Annotated[str, typer.Option(help="no, fp16 or bf16.",
                                                 callback=choice("no", "fp16", "bf16"))] = "no",
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: only at the end).", min=0)] = 0,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank.", min=1)] = 4,
    lora_target: Annotated[list[str] | None, typer.Option(help="LoRA target module suffix; repeat. Default: attention projections.")] = None,
    skip_frozen_targets: Annotated[bool, typer.Option(help="Skip explicit LoRA targets that own frozen tensors.")] = False,
    caption_column: Annotated[str, typer.Option(help="Caption column of the metadata file.")] = "text",
    random_flip: Annotated[bool, typer.Option(help="Random horizontal flips.")] = False,
    config: ConfigOpt = None,
    show_config: PrintConfigOpt = False,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fine-tune a model, full or LoRA, under a guard; frozen tensors are audited before anything is written.

    Without --guard: unguarded. Writes OUT/model (full) or OUT/lora, OUT/metrics.json and checkpoints.

    The defaults are the user the benchmark evaluates guards against (400 AdamW steps, batch 32, lr 1e-4).
    Rerunning the same command continues from the latest checkpoint in --out (Ctrl-C stops at a step
    boundary and checkpoints)."""
    _offline()
    from ..data import ImageCaptionFolder, ImageTransform
    from ..finetuning import FinetuneConfig
    from ..finetuning import finetune as run_finetune
    from ..guard import Guard

    cfg = config_from(ctx, config, FINETUNE_FIELDS, FinetuneConfig)
    if show_config:
        print_config(cfg)
        return
    m = load_model_arg(model)
    g = Guard.load(guard) if guard else None
    dataset = ImageCaptionFolder(data, ImageTransform(m.resolution, random_flip=random_flip),
                                 caption_column=caption_column)
    result = run_finetune(m, dataset, guard=g, config=cfg, output_dir=out, overwrite=overwrite)
    rec = result.record()
    typer.echo(f"wrote {result.output}")
    for part, label in (("unet", "UNet"), ("text_encoder", "text encoder")):
        s = rec[part]
        if part == "unet" and result.lora_modules:  # adapters: their size against the UNet they adapt
            tensors = f"LoRA adapters on {len(result.lora_modules)} modules"
        else:
            tensors = f"{s['trainable_tensors']}/{s['tensors']} tensors ({s['tensor_share']:.1%})"
        typer.echo(f"trained, {label}: {tensors}, "
                   f"{s['trainable_parameters']:,}/{s['parameters']:,} parameters ({s['parameter_share']:.1%})")
    if g is not None:
        typer.echo(f"guard: {frozen_shares(g)}")
    if result.skipped_modules:
        typer.echo(f"LoRA skipped {len(result.skipped_modules)} frozen module(s): {', '.join(result.skipped_modules[:5])}"
                   + (" ..." if len(result.skipped_modules) > 5 else ""))
    if result.audit is not None:
        typer.echo(f"audit: {result.audit.describe()}")
