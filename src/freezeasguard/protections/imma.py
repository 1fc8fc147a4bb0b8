"""IMMA (Zheng & Yeh): attention weights take gradient-ascent steps against a LoRA that keeps re-learning the
illegal data; the adapter is then removed and the immunised weights released."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..configs import JsonConfig
from ..guard import unet_tensors
from .common import encoded, objective_of, seeded_batches
from .registry import Release, ReleaseContext, register


@dataclass
class IMMAConfig(JsonConfig):
    steps: int = 100
    lr: float = 1e-4  # the weights' ascent
    lora_lr: float = 1e-3  # the re-learning adapter
    rank: int = 4
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("steps", "rank", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"IMMAConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "lora_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"IMMAConfig.{name} must be > 0, got {getattr(self, name)}")


@register("imma", IMMAConfig, accepts_prior=False)
def imma(ctx: ReleaseContext, config: IMMAConfig, prior: Release | None) -> Release:
    """IMMA: attention weights take gradient-ascent steps against a LoRA that keeps re-learning the illegal data."""
    info = imma_immunize(ctx.model, ctx.illegal, steps=config.steps, seed=ctx.seed, lr=config.lr,
                         lora_lr=config.lora_lr, rank=config.rank, batch_size=config.batch_size)
    return Release(ctx.model, None, info)


def strip_adapters(unet: Any) -> Any:
    """A plain UNet of the same config holding the (possibly edited) base weights, without peft wrappers."""
    state = {n: t.detach().clone() for n, t in unet_tensors(unet).items()}
    buffers = {n: b for n, b in unet.named_buffers()}
    plain = type(unet).from_config(unet.config)
    missing, unexpected = plain.load_state_dict({**buffers, **state}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"could not strip adapters: missing {missing[:3]}, unexpected {unexpected[:3]}")
    plain.to(next(unet.parameters()).device).eval().requires_grad_(False)
    return plain


def imma_immunize(model: Any, illegal: Any, *, steps: int = 100, seed: int = 0, lr: float = 1e-4,
                  lora_lr: float = 1e-3, rank: int = 4, batch_size: int = 16) -> dict[str, Any]:
    """Alternate: a LoRA adapter descends the illegal loss; the attention projections (the weights it adapts)
    ascend the loss of the adapted model. The adapter is then removed; the immunised weights are released."""
    from peft import LoraConfig

    from ..finetuning import DEFAULT_LORA_TARGETS
    from ..seeding import STREAM_ADAPTER, derive_seed, seeded_global_rng

    enc = encoded(model, illegal)
    objective = objective_of(model)
    for p in objective.parameters():
        p.requires_grad_(False)
    with seeded_global_rng(derive_seed(seed, STREAM_ADAPTER)):  # peft initialises lora_A from the global RNG
        model.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                          target_modules=list(DEFAULT_LORA_TARGETS)), adapter_name="imma")
    lora = [p for n, p in model.unet.named_parameters() if ".lora_" in n]
    theta = [p for n, p in model.unet.named_parameters() if ".base_layer." in n]
    for p in lora + theta:
        p.requires_grad_(True)
    opt_lora = torch.optim.AdamW(lora, lr=lora_lr)
    opt_theta = torch.optim.Adam(theta, lr=lr, maximize=True)
    losses = []


    def step_on(params: list[torch.Tensor], opt: torch.optim.Optimizer, batch: dict[str, Any]) -> float:
        # gradient of the loss for this group only; the other group's grads stay untouched
        loss = objective(batch)
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for batch in seeded_batches(enc, steps, batch_size, seed):
        step_on(lora, opt_lora, batch)  # the adapter re-learns the illegal data
        losses.append(step_on(theta, opt_theta, batch))  # the weights ascend the adapted model's loss
    model.unet = strip_adapters(model.unet)
    return {"imma_steps": steps, "imma_loss_first": losses[0] if losses else None,
            "imma_loss_last": losses[-1] if losses else None, "imma_immunized_tensors": len(theta)}
