"""Which tensors to immunise, chosen by what immunising them would cost the attacker per unit of legal cost.

The learned mask picks the tensors to freeze at their released values; here the choice is made for the values a
later `immunise` stage will move. Immunising a tensor T means ascending the attacked model's illegal loss along
T, so its worth is read where the attacker is, not at the release: simulated attackers (AdamW on everything not
yet frozen, rates drawn log-uniformly from a range wider than the battery's) relearn for `horizon` steps from
the release, and at each attacked state, per tensor,

    harm(T)  = |g_illegal(T)|_1                 what a sign step of the values along T raises the illegal loss
    cost(T)  = max(0, g_legal(T) . sign(g_illegal(T)))    what the same step raises the legal loss
    need(T)  = |g_legal(T)|_1 at the release    what the legal user loses by not training T

(first-order, per unit step). A tensor's score is  harm / (cost + legal_weight * need), summed over the attacked
states; the tensors frozen before this stage score highest, so they stay frozen and count in the ratio, and the
rest fill the ratio's parameter budget greedily by score. Only the frozen set changes: the values move in the
`immunise` stage after it, which frees the selected non-cross-attention tensors with `free_tensors`
(`freeze-cross-attention+immunise-select+immunise`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..configs import JsonConfig
from ..guard import Guard, select_top, unet_tensors
from ..seeding import STREAM_SELECT_RATE, derive_seed
from .common import encoded, objective_of, seeded_batch
from .registry import Release, ReleaseContext, register

# seeded_batch streams of the selection: the attackers' batches, the batches the gradients are read on
STREAM_SELECT_ATTACK, STREAM_SELECT_ILLEGAL, STREAM_SELECT_LEGAL = 11, 12, 13


@dataclass
class SelectConfig(JsonConfig):
    restarts: int = 4  # simulated attackers, each from the release
    horizon: int = 25  # the steps each relearns before its gradients are read
    attack_lr: float = 1e-4
    # each attacker's AdamW rate is drawn log-uniformly in [attack_lr, attack_lr * attack_lr_spread] (seeded):
    # wider than the battery's 10x, so the choice is not made for one attacker
    attack_lr_spread: float = 30.0
    batch_size: int = 16
    legal_weight: float = 1.0  # the weight of what a legal user loses by not training a tensor

    def __post_init__(self) -> None:
        for name in ("restarts", "horizon", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SelectConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.attack_lr > 0 or not self.attack_lr_spread >= 1.0:
            raise ValueError(f"SelectConfig: attack_lr must be > 0 and attack_lr_spread >= 1, got "
                             f"{self.attack_lr} and {self.attack_lr_spread}")
        if not self.legal_weight >= 0:
            raise ValueError(f"SelectConfig.legal_weight must be >= 0, got {self.legal_weight}")


def _grads(objective: Any, batch: Any, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(objective(batch), list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g.detach() for (n, p), g in zip(params.items(), grads)}


def immunise_scores(model: Any, frozen: set[str], illegal: Any, legal: Any, config: SelectConfig | None = None,
                    *, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per UNet tensor not in `frozen`: its summed harm, cost and need (see the module doc) and its score. The
    model comes back as it was."""
    cfg = config or SelectConfig()
    objective = objective_of(model)
    for p in objective.parameters():
        p.requires_grad_(False)
    params = {n: p for n, p in unet_tensors(model.unet).items() if n not in frozen}
    if not params:
        raise ValueError("immunise-select: every UNet tensor is frozen already; nothing to choose from")
    ill, leg = encoded(model, illegal), encoded(model, legal)
    release = {n: p.detach().clone() for n, p in params.items()}
    harm = dict.fromkeys(params, 0.0)
    cost = dict.fromkeys(params, 0.0)
    for p in params.values():
        p.requires_grad_(True)
    try:
        need = {n: float(g.abs().sum()) for n, g in _grads(objective, seeded_batch(leg, 0, cfg.batch_size, seed,
                                                                                       STREAM_SELECT_LEGAL), params).items()}
        for r in range(cfg.restarts):
            u = torch.rand((), generator=torch.Generator().manual_seed(derive_seed(seed, STREAM_SELECT_RATE, r)))
            rate = cfg.attack_lr * cfg.attack_lr_spread ** float(u)
            attacker = torch.optim.AdamW(list(params.values()), lr=rate)
            for step in range(cfg.horizon):
                loss = objective(seeded_batch(ill, r * cfg.horizon + step, cfg.batch_size, seed, STREAM_SELECT_ATTACK))
                attacker.zero_grad(set_to_none=True)
                loss.backward()
                attacker.step()
            g_ill = _grads(objective, seeded_batch(ill, r, cfg.batch_size, seed, STREAM_SELECT_ILLEGAL), params)
            g_leg = _grads(objective, seeded_batch(leg, r + 1, cfg.batch_size, seed, STREAM_SELECT_LEGAL), params)
            for n in params:
                harm[n] += float(g_ill[n].abs().sum())
                cost[n] += max(0.0, float((g_leg[n] * g_ill[n].sign()).sum()))
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(release[n])
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(release[n])
                p.grad = None
                p.requires_grad_(False)
    tiny = 1e-30
    return {n: {"harm": harm[n], "cost": cost[n], "need": cfg.restarts * need[n],
                "score": harm[n] / (cost[n] + cfg.legal_weight * cfg.restarts * need[n] + tiny)} for n in params}


@register("immunise-select", SelectConfig, needs_ratio=True)
def immunise_select(ctx: ReleaseContext, config: SelectConfig, prior: Release | None) -> Release:
    """Freeze, up to the ratio (the stages before it included), the tensors whose immunising would raise the
    relearning attacker's illegal loss most per unit of legal cost; their values are a later immunise stage's
    to move (see the module doc)."""
    before = set(prior.guard.frozen) if prior is not None and prior.guard is not None else set()
    model = prior.model if prior is not None else ctx.model
    table = immunise_scores(model, before, ctx.illegal, ctx.legal, config, seed=ctx.seed)
    above = 2 * max((t["score"] for t in table.values()), default=0.0) + 1.0  # earlier stages' tensors first
    scores = {n: above for n in before} | {n: t["score"] for n, t in table.items()}
    sizes = {n: p.numel() for n, p in unet_tensors(model.unet).items()}
    frozen = set(select_top(scores, sizes, ctx.ratio, ratio_by=ctx.ratio_by))
    if before - frozen:
        raise ValueError(f"immunise-select: ratio {ctx.ratio:g} ({ctx.ratio_by}) is below what the stages before it "
                         f"froze ({len(before - frozen)} of their tensors would thaw); raise the ratio")
    selected = len(frozen - before)
    guard = Guard.from_names(model.unet, sorted(frozen), method="immunise-select", scores=scores,
                             provenance={**(prior.guard.provenance if prior and prior.guard else {}),
                                         "immunise_select": config.to_dict(), "selected": selected})
    info = {**(prior.info if prior is not None else {}),
            "immunise_select": {"selected": selected, "kept_from_before": len(before)}}
    return Release(model, guard, info)
