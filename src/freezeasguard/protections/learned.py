"""FreezeAsGuard's own protection: the guard learned by bilevel mask learning (`freezeasguard.learn`)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from ..learn import LearnConfig, learn_guard
from .registry import Release, ReleaseContext, register


@register("guard", LearnConfig, needs_ratio=True)
def guard(ctx: ReleaseContext, config: LearnConfig, prior: Release | None) -> Release:
    """FreezeAsGuard: the learned guard (bilevel mask learning). After another stage, the mask learns among
    the tensors that stage left trainable, for the rest of the ratio (its frozen set counts toward it)."""
    cfg = dataclasses.replace(config, ratio=ctx.ratio, ratio_by=ctx.ratio_by, seed=ctx.seed)
    always = list(prior.guard.frozen) if prior is not None and prior.guard is not None else []
    out = ctx.output_dir if ctx.output_dir is None or not always else Path(ctx.output_dir) / "learn"
    learned = learn_guard(copy.deepcopy(ctx.model), ctx.illegal, ctx.legal, cfg, output_dir=out,
                          always_frozen=always)
    if prior is not None and prior.guard is not None:
        learned = dataclasses.replace(learned, provenance={**prior.guard.provenance, **learned.provenance})
    return Release(ctx.model, learned, dict(prior.info) if prior else {})
