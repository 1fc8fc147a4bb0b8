"""Text-blind frozen keys and values: the illegal text directions projected out of what the UNet can read.

The UNet reads the prompt only through the cross-attention key and value weights (`attn2.to_k`, `attn2.to_v`:
`reads_text`). If every one of them is frozen, and each is released as W (I - P), where P projects onto the
directions of text-embedding space that carry the publisher's illegal captions (`illegal_text_subspace`: most
illegal energy relative to legal, orthogonal to the empty prompt), then two prompts whose embeddings differ only
inside P give the UNet the same keys and values, whatever the trainable rest holds. No learning rate, schedule,
budget or adapter on the trainable rest can make the UNet tell them apart again: what an attacker can still
learn is only what the embeddings carry outside P.

Unlike `immunise`, nothing here simulates an attacker, so nothing is tuned to one: the release is a closed form
of the publisher's captions. What it cannot stop, by construction: a user who names the protected concept with
words whose embeddings lie outside P (the battery's `renamed` and `synonym` attacks measure how far that goes),
and, on SDXL, the pooled text embedding that enters through the time embedding (`add_embedding`), which this
stage does not touch.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..configs import JsonConfig
from .components import reads_text
from .registry import Release, ReleaseContext, register


@dataclass
class NullspaceConfig(JsonConfig):
    # Directions projected out of every frozen key and value weight (`illegal_text_subspace`'s rank).
    rank: int = 8
    # Keep the directions of the empty prompt (the unconditional branch of guided sampling) as released.
    hold_empty_prompt: bool = True

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"NullspaceConfig.rank must be >= 1, got {self.rank}")


def project_out_(weights: list[torch.Tensor], proj: torch.Tensor) -> None:
    """W <- W (I - P) in place, for each [out, D] weight (computed in float64, stored in the weight's dtype)."""
    with torch.no_grad():
        for w in weights:
            w64 = w.double()
            w.copy_(w64 - w64 @ proj.double())


def nullspace_release(model: Any, guard: Any, illegal: Any, legal: Any, config: NullspaceConfig | None = None) \
        -> tuple[Any, dict[str, Any]]:
    """Project the illegal text subspace out of the frozen key/value weights of `model` (in place); return the
    new guard (fingerprinted on the new values) and what was done. `guard` must belong to `model`."""
    from ..guard import Guard
    from .common import encoded
    from .immunise import illegal_text_subspace

    cfg = config or NullspaceConfig()
    guard.check_values(model.unet)
    params = dict(model.unet.named_parameters())
    readers = sorted(n for n in params if reads_text(n))
    frozen = set(guard.frozen)
    targets = [n for n in readers if n in frozen]
    if not targets:
        raise ValueError("nullspace: the frozen set holds no cross-attention key/value weight, so nothing the user "
                         "cannot retrain reads the text (use e.g. freeze-kv+nullspace)")
    open_readers = [n for n in readers if n not in frozen]
    if open_readers:
        # A trainable key/value weight lets the user read the projected directions again: say so, loudly.
        warnings.warn(f"nullspace: {len(open_readers)} cross-attention key/value weight(s) stay trainable, e.g. "
                      f"{open_readers[:2]}; a user can learn to read the illegal directions through them", stacklevel=2)
    ill, leg = encoded(model, illegal), encoded(model, legal)
    with torch.no_grad():
        empty = model.encode_prompts([""]).cpu() if cfg.hold_empty_prompt else None
    proj, info = illegal_text_subspace(ill.embeddings, leg.embeddings, cfg.rank, keep=empty)
    before = {n: params[n].detach().double().clone() for n in targets}
    project_out_([params[n] for n in targets], proj)
    change = {n: float((params[n].detach().double() - before[n]).norm() / (before[n].norm() + 1e-12)) for n in targets}
    provenance = {**guard.provenance, "nullspace": {**cfg.to_dict(), "subspace": info, "projected": len(targets),
                                                    "trainable_readers": len(open_readers)}}
    new = dataclasses.replace(Guard.from_names(model.unet, sorted(frozen), method=f"{guard.method}+nullspace",
                                               scores=guard.scores, provenance=provenance),
                              allow_text_encoder=guard.allow_text_encoder, text_encoders=guard.text_encoders)
    return new, {"nullspace": {**cfg.to_dict(), "subspace": info, "projected_tensors": len(targets),
                               "trainable_readers": len(open_readers),
                               "mean_relative_change": sum(change.values()) / len(change)}}


@register("nullspace", NullspaceConfig)
def nullspace(ctx: ReleaseContext, config: NullspaceConfig, prior: Release | None) -> Release:
    """The frozen set of the stages before it, its cross-attention keys and values blind to the illegal text
    directions (projected out: no attacker can make the UNet read them again)."""
    if prior is None or prior.guard is None:
        raise ValueError("nullspace: the stages before it released no guard (use e.g. freeze-kv+nullspace)")
    if ctx.model.text_encoder is None or getattr(prior.guard, "allow_text_encoder", False):
        raise ValueError("nullspace: the text encoder must stay frozen (a trainable one moves the embeddings "
                         "out of the projected directions)")
    guard, info = nullspace_release(prior.model, prior.guard, ctx.illegal, ctx.legal, config)
    return Release(prior.model, guard, {**prior.info, **info})
