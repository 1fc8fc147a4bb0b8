"""The references: no protection, and random freezing."""

from __future__ import annotations

from ..guard import Guard
from .common import joined
from .registry import NoConfig, Release, ReleaseContext, register


@register("none", accepts_prior=False)
def none(ctx: ReleaseContext, config: NoConfig, prior: Release | None) -> Release:
    """No protection: users fine-tune the base freely (full fine-tuning)."""
    return Release(ctx.model, None)


@register("random", needs_ratio=True)
def random(ctx: ReleaseContext, config: NoConfig, prior: Release | None) -> Release:
    """Random freezing at the same ratio (seeded)."""
    guard = Guard.random(ctx.model.unet, ctx.ratio, seed=ctx.seed, ratio_by=ctx.ratio_by)
    return Release(ctx.model, joined(prior, ctx.model, guard, method="random"), dict(prior.info) if prior else {})
