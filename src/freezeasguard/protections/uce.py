"""UCE (Gandikota et al.): a closed-form edit of the cross-attention key/value projections that maps the
illegal captions' tokens onto a guide's while preserving other prompts'. The relearn scenarios' publisher
unlearns with it before releasing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..configs import JsonConfig
from .registry import Release, ReleaseContext, register


@dataclass
class UCEConfig(JsonConfig):
    lam: float = 1.0  # weight of the preserved prompts' projections

    def __post_init__(self) -> None:
        if not self.lam >= 0:
            raise ValueError(f"UCEConfig.lam must be >= 0, got {self.lam}")


@register("uce", UCEConfig, accepts_prior=False)
def uce(ctx: ReleaseContext, config: UCEConfig, prior: Release | None) -> Release:
    """UCE: closed-form edit of the cross-attention key/value projections (illegal concepts -> a guide)."""
    p = ctx.prompts
    info = uce_edit(ctx.model, p.get("uce_edit", []), p.get("uce_guide", []), p.get("uce_preserve", []),
                    lam=config.lam)
    return Release(ctx.model, None, {k: v for k, v in info.items() if k != "uce_edited_tensors"})


def uce_closed_form(W: torch.Tensor, edit: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor,
                    lam: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """argmin_W' sum_i |W' c_i - W c*_i|^2 + lam sum_j |W' c_j - W c_j|^2 + eps |W' - W|^2.

    `edit` and `guide` are [n, d] rows c_i and c*_i, `preserve` [m, d] rows c_j; W is [out, d]. Solution:
    W' = (W G^T E + lam W P^T P + eps W)(E^T E + lam P^T P + eps I)^-1 with E, G, P the row matrices.
    """
    W64, E, G, P = W.double(), edit.double(), guide.double(), preserve.double()
    d = W.shape[1]
    lhs = E.T @ E + lam * P.T @ P + eps * torch.eye(d, dtype=torch.float64)
    rhs = W64 @ G.T @ E + lam * W64 @ P.T @ P + eps * W64
    return torch.linalg.solve(lhs, rhs.T).T.to(W.dtype)


def _hidden(model: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [n, L] and text-encoder hidden states [n, L, d] of the prompts, padded as the UNet sees them."""
    with torch.no_grad():
        ids = model.tokenize(list(prompts))
        # the states K/V read (SDXL: both text encoders', concatenated); its tokenizers agree on every position
        # up to the end token, and the positions after it are paired by position
        hidden = model.encode_prompts(list(prompts)).cpu()
    return ids.cpu(), hidden


def _first(row: torch.Tensor, token: int) -> int:
    hits = (row == token).nonzero()
    return int(hits[0]) if len(hits) else len(row)


def _aligned_pairs(ids_e: torch.Tensor, ids_g: torch.Tensor, eos: int) -> list[tuple[int, int]]:
    """Position pairs (edit, guide) of two padded captions that differ in a middle span ("a police officer" vs
    "a person"): the shared suffix, the end token and the padding after it are paired counting from the end
    token, the differing span maps onto the guide's span (its last token where the guide's is shorter). The
    shared prefix is left out: causal attention makes it identical in both. Every position the UNet attends to
    after the prefix is paired, so the edited caption is seen as the guide."""
    end_e, end_g = _first(ids_e, eos), _first(ids_g, eos)
    p = 1
    while p < min(end_e, end_g) and ids_e[p] == ids_g[p]:
        p += 1
    s = 0
    while s < min(end_e, end_g) - p and ids_e[end_e - 1 - s] == ids_g[end_g - 1 - s]:
        s += 1
    pairs = []
    mid_g = max(end_g - s - p, 0)
    for i in range(p, end_e - s):  # the differing span
        pairs.append((i, p + min(i - p, mid_g - 1) if mid_g else p - 1))
    for k in range(-s, len(ids_e) - max(end_e, end_g)):  # shared suffix, end token, padding
        pairs.append((end_e + k, end_g + k))
    return pairs


def _token_rows(model: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Hidden states of every position (padding included: the UNet attends to it), stacked [n, d]; the start
    token, the same in every caption and where attention sinks, once."""
    if not prompts:
        return torch.zeros(0, model.unet.config.cross_attention_dim)
    _, hidden = _hidden(model, prompts)
    return torch.cat([hidden[:1, 0], hidden[:, 1:].reshape(-1, hidden.shape[-1])])


def uce_edit(model: Any, edit_prompts: Sequence[str], guide_prompts: Sequence[str],
             preserve_prompts: Sequence[str], *, lam: float = 1.0) -> dict[str, Any]:
    """Edit every cross-attention to_k / to_v of the UNet in place so edit prompts' tokens project like the
    guide prompts' tokens, while preserve prompts' tokens keep their projections."""
    if len(edit_prompts) != len(guide_prompts):
        raise ValueError("UCE needs one guide prompt per edited prompt")
    width = model.unet.config.cross_attention_dim
    E, G = torch.zeros(0, width), torch.zeros(0, width)
    if edit_prompts:
        ids_e, hid_e = _hidden(model, edit_prompts)
        ids_g, hid_g = _hidden(model, guide_prompts)
        eos = model.tokenizer.eos_token_id
        pairs = [(n, i, j) for n in range(len(ids_e)) for i, j in _aligned_pairs(ids_e[n], ids_g[n], eos)]
        E = torch.stack([hid_e[n, i] for n, i, _ in pairs])
        G = torch.stack([hid_g[n, j] for n, _, j in pairs])
    P = _token_rows(model, preserve_prompts)
    edited = []
    with torch.no_grad():
        for name, module in model.unet.named_modules():
            if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
                module.weight.copy_(uce_closed_form(module.weight, E, G, P, lam))
                edited.append(f"{name}.weight")
    return {"uce_edited_tensors": edited, "edit_rows": len(E), "preserve_rows": len(P), "lambda": lam}
