"""One-shot importance freezing: score every UNet tensor once, freeze the top scores within the ratio."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..configs import JsonConfig, TrainConfig
from ..guard import Guard, unet_tensors
from .common import encoded, joined, objective_of, seeded_batches
from .registry import Release, ReleaseContext, register

STREAM_ILLEGAL, STREAM_LEGAL = 0, 1  # importance-ratio's two gradient samples


@dataclass
class GradientConfig(JsonConfig):
    """The sample the gradient norms are taken on."""

    n_batches: int = 4
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("n_batches", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"GradientConfig.{name} must be >= 1, got {getattr(self, name)}")


def _default_warm() -> TrainConfig:
    return TrainConfig(max_steps=200, batch_size=32, learning_rate=1e-4, optimizer="adamw", checkpoint_every=100)


@dataclass
class WarmStartConfig(JsonConfig):
    """The mixed (half illegal, half legal) fine-tune whose weight changes score the tensors."""

    warm_start: TrainConfig = field(default_factory=_default_warm)

    def __post_init__(self) -> None:
        if isinstance(self.warm_start, dict):
            self.warm_start = TrainConfig.from_dict(self.warm_start)
        if self.warm_start.batch_size % 2:
            raise ValueError("WarmStartConfig.warm_start.batch_size must be even (half illegal, half legal)")


def gradient_sq_norms(model: Any, data: Any, *, n_batches: int = 4, batch_size: int = 16, seed: int = 0,
                      stream: int = STREAM_ILLEGAL) -> dict[str, float]:
    """Per UNet tensor: the squared norm of the denoising-loss gradient on `data`, per parameter element."""
    objective = objective_of(model)
    enc = encoded(model, data)
    params = unet_tensors(model.unet)
    for p in objective.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    for batch in seeded_batches(enc, n_batches, batch_size, seed, stream):
        (objective(batch) / n_batches).backward()
    out = {n: float(p.grad.double().pow(2).sum() / p.numel()) if p.grad is not None else 0.0 for n, p in params.items()}
    for p in params.values():
        p.grad = None
        p.requires_grad_(False)
    return out


def warm_start(model: Any, ctx: ReleaseContext, warm: TrainConfig) -> dict[str, torch.Tensor]:
    """The mixed fine-tune of `warm`, returned as UNet tensors (the model is untouched)."""
    from ..learn import train_mixed

    tuned = copy.deepcopy(model)
    objective = objective_of(tuned)
    params = {f"unet.{n}": p for n, p in tuned.unet.named_parameters()}
    train_mixed(objective, encoded(tuned, ctx.illegal), encoded(tuned, ctx.legal), params,
                dataclasses.replace(warm, seed=ctx.seed), desc="warm start (importance)")
    return {n: p.detach().clone() for n, p in unet_tensors(tuned.unet).items()}


def _release(ctx: ReleaseContext, prior: Release | None, scores: dict[str, float], method: str) -> Release:
    guard = Guard.from_scores(ctx.model.unet, scores, ctx.ratio, ratio_by=ctx.ratio_by, method=method)
    return Release(ctx.model, joined(prior, ctx.model, guard, method=method), dict(prior.info) if prior else {})


@register("importance-change", WarmStartConfig, needs_ratio=True)
def importance_change(ctx: ReleaseContext, config: WarmStartConfig, prior: Release | None) -> Release:
    """One-shot: freeze the tensors that moved most (relative change) in the mixed warm-start fine-tune."""
    base = {n: t.detach() for n, t in unet_tensors(ctx.model.unet).items()}
    tuned = warm_start(ctx.model, ctx, config.warm_start)
    scores = {n: float((tuned[n] - t).double().norm() / (t.double().norm() + 1e-12)) for n, t in base.items()}
    return _release(ctx, prior, scores, "importance-change")


@register("importance-grad", GradientConfig, needs_ratio=True)
def importance_grad(ctx: ReleaseContext, config: GradientConfig, prior: Release | None) -> Release:
    """One-shot: freeze the tensors with the largest illegal-domain gradient per parameter."""
    scores = gradient_sq_norms(ctx.model, ctx.illegal, n_batches=config.n_batches, batch_size=config.batch_size,
                               seed=ctx.seed)
    return _release(ctx, prior, scores, "importance-grad")


@register("importance-ratio", GradientConfig, needs_ratio=True)
def importance_ratio(ctx: ReleaseContext, config: GradientConfig, prior: Release | None) -> Release:
    """One-shot: freeze the tensors with the largest ratio of illegal to legal gradient norms."""
    kw = {"n_batches": config.n_batches, "batch_size": config.batch_size, "seed": ctx.seed}
    ill = gradient_sq_norms(ctx.model, ctx.illegal, stream=STREAM_ILLEGAL, **kw)
    leg = gradient_sq_norms(ctx.model, ctx.legal, stream=STREAM_LEGAL, **kw)
    scores = {n: (ill[n] / (leg[n] + 1e-30)) ** 0.5 for n in ill}
    return _release(ctx, prior, scores, "importance-ratio")
