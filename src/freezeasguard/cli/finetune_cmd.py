"""`freezeasguard finetune`: guarded fine-tuning from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from . import ModelOpt, _fail, _offline, app, load_model_arg


@app.command()
def finetune(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="Image folder with metadata.jsonl/.csv captions or .txt sidecars.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (checkpoints, model or LoRA, records).")],
    model: ModelOpt = "embedded",
    guard: Annotated[Path | None, typer.Option("--guard", "-g", help="Guard JSON; omit for unguarded fine-tuning.")] = None,
    method: Annotated[str, typer.Option(help="'full' or 'lora'.")] = "full",
    steps: Annotated[int, typer.Option(help="Optimizer steps (default: the benchmark's attacker).")] = 400,
    batch_size: Annotated[int, typer.Option(help="Per-process micro-batch.")] = 32,
    accumulation: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Seed of data order and noise.")] = 0,
    mixed_precision: Annotated[str, typer.Option(help="no, fp16 or bf16.")] = "no",
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: only at the end).")] = 0,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank.")] = 4,
    lora_target: Annotated[list[str] | None, typer.Option(help="LoRA target module suffix; repeat. Default: attention projections.")] = None,
    skip_frozen_targets: Annotated[bool, typer.Option(help="Skip explicit LoRA targets that own frozen tensors.")] = False,
    caption_column: Annotated[str, typer.Option(help="Caption column of the metadata file.")] = "text",
    random_flip: Annotated[bool, typer.Option(help="Random horizontal flips.")] = False,
    config: Annotated[Path | None, typer.Option(help="FinetuneConfig as JSON; explicit options above override it.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier run's results in --out (other files are kept).")] = False,
) -> None:
    """Fine-tune a model, full or LoRA, under a guard; the frozen tensors are audited before anything is written.

    Rerunning the same command continues from the latest checkpoint in --out (Ctrl-C stops at a step
    boundary and checkpoints)."""
    _offline()
    from ..data import ImageCaptionFolder, ImageTransform
    from ..errors import FreezeAsGuardError
    from ..finetuning import FinetuneConfig
    from ..finetuning import finetune as run_finetune
    from ..guard import Guard

    def given(name: str) -> bool:
        source = ctx.get_parameter_source(name)
        return source is not None and source.name != "DEFAULT"

    try:
        base = json.loads(config.read_text()) if config else {}
        train = dict(base.pop("train", {}))
        for opt, key, value in (("steps", "max_steps", steps), ("batch_size", "batch_size", batch_size),
                                ("accumulation", "gradient_accumulation", accumulation), ("lr", "learning_rate", lr),
                                ("seed", "seed", seed), ("mixed_precision", "mixed_precision", mixed_precision),
                                ("checkpoint_every", "checkpoint_every", checkpoint_every)):
            if given(opt) or key not in train:
                train[key] = value
        for opt, key, value in (("method", "method", method), ("lora_rank", "lora_rank", lora_rank),
                                ("skip_frozen_targets", "skip_frozen_targets", skip_frozen_targets)):
            if given(opt) or key not in base:
                base[key] = value
        if lora_target:
            base["lora_targets"] = tuple(lora_target)
        cfg = FinetuneConfig(train=train, **base)
        m = load_model_arg(model)
        g = Guard.load(guard) if guard else None
        dataset = ImageCaptionFolder(data, ImageTransform(m.resolution, random_flip=random_flip),
                                     caption_column=caption_column)
        result = run_finetune(m, dataset, guard=g, config=cfg, output_dir=out, overwrite=overwrite)
    except (FreezeAsGuardError, ValueError, OSError) as exc:
        raise _fail(exc) from exc
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
    if result.skipped_modules:
        typer.echo(f"LoRA skipped {len(result.skipped_modules)} frozen module(s): {', '.join(result.skipped_modules[:5])}"
                   + (" ..." if len(result.skipped_modules) > 5 else ""))
    if result.audit is not None:
        typer.echo(f"audit: {result.audit.describe()}")
