"""`freezeasguard learn`: learn a guard from illegal and legal samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from . import ModelOpt, _fail, _offline, app, load_model_arg


def scenario_data(name: str, resolution: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """The publisher's illegal and legal datasets of an embedded scenario (legal = legal-near + legal-far)."""
    from .. import emoji

    sc = emoji.scenario(name, seed)
    illegal = emoji.dataset(sc.items("illegal", "publisher"), resolution, preload=True)
    legal_items = sc.items("legal_near", "publisher") + sc.items("legal_far", "publisher")
    legal = emoji.dataset(legal_items, resolution, preload=True)
    return illegal, legal, sc


@app.command()
def learn(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory: guard.json, learn.json, learn.png, mask.png, checkpoints.")],
    model: ModelOpt = "embedded",
    scenario: Annotated[str | None, typer.Option(help="Embedded scenario for the data: figures or artstyle.")] = None,
    illegal: Annotated[Path | None, typer.Option(help="Image folder of the illegal domain (publisher's samples).")] = None,
    legal: Annotated[Path | None, typer.Option(help="Image folder of the legal domain (publisher's samples).")] = None,
    ratio: Annotated[float | None, typer.Option(help="Freeze ratio (default 0.3).")] = None,
    by: Annotated[str | None, typer.Option(help="'count' (fraction of tensors) or 'params' (parameter budget).")] = None,
    mask_steps: Annotated[int | None, typer.Option(help="Mask steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (data order, noise, scenario split).")] = None,
    warm_start_model: Annotated[Path | None, typer.Option(help="Already fine-tuned model to start theta_ft from "
                                                                "(skips the warm-start fine-tune).")] = None,
    config: Annotated[Path | None, typer.Option(help="LearnConfig as JSON; explicit options override it.")] = None,
    caption_column: Annotated[str, typer.Option(help="Caption column of the folders' metadata.")] = "text",
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier run's results in --out (other files are kept).")] = False,
) -> None:
    """Learn a guard (FreezeAsGuard's bilevel mask learning). Rerun the same command to resume."""
    _offline()
    from ..data import ImageCaptionFolder, ImageTransform
    from ..errors import FreezeAsGuardError
    from ..learn import LearnConfig, learn_guard
    from ..model import DiffusionModel

    try:
        data = json.loads(config.read_text()) if config else {}
        for key, value in (("ratio", ratio), ("ratio_by", by), ("mask_steps", mask_steps), ("seed", seed)):
            if value is not None:
                data[key] = value
        cfg = LearnConfig.from_dict(data)
        m = load_model_arg(model)
        if scenario is not None:
            if illegal or legal:
                raise ValueError("give either --scenario or --illegal/--legal, not both")
            ill, leg, _ = scenario_data(scenario, m.resolution, cfg.seed)
        elif illegal and legal:
            transform = ImageTransform(m.resolution)
            ill = ImageCaptionFolder(illegal, transform, caption_column=caption_column)
            leg = ImageCaptionFolder(legal, transform, caption_column=caption_column)
        else:
            raise ValueError("give --scenario, or both --illegal and --legal image folders")
        warm = DiffusionModel.from_pretrained(warm_start_model) if warm_start_model else None
        guard = learn_guard(m, ill, leg, cfg, output_dir=out, warm_start_model=warm,
                            provenance={"model": str(model), "scenario": scenario}, overwrite=overwrite)
    except (FreezeAsGuardError, ValueError, OSError) as exc:
        raise _fail(exc) from exc
    s = guard.summary()
    typer.echo(f"wrote {out / 'guard.json'}: {s['frozen_tensors']}/{s['total_tensors']} tensors frozen "
               f"({s['ratio_by_count']:.1%} by count, {s['ratio_by_params']:.1%} of parameters); "
               f"per block: {out / 'mask.png'}")
