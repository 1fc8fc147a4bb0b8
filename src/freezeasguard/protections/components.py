"""The paper's component ablations: whole kinds of tensor frozen at once, whatever the ratio."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..guard import Guard, unet_tensors
from .common import joined
from .registry import NoConfig, Release, ReleaseContext, register


def reads_text(name: str) -> bool:
    """A UNet weight that reads the text embeddings: a cross-attention key or value projection."""
    return name.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))


COMPONENTS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "freeze-cross-attention": ("every cross-attention projection (attn2 to_q/to_k/to_v/to_out)",
                               lambda n: ".attn2.to_" in n),
    "freeze-kv": ("every cross-attention key and value weight (what reads the text)", reads_text),
    "freeze-resnets": ("every resnet block", lambda n: ".resnets." in n),
    "freeze-time-embedding": ("the time embedding", lambda n: n.startswith("time_embedding.")),
}


def component_names(unet: Any, kind: str) -> list[str]:
    if kind not in COMPONENTS:
        raise ValueError(f"unknown component {kind!r}; known: {', '.join(COMPONENTS)}")
    _, match = COMPONENTS[kind]
    names = [n for n in unet_tensors(unet) if match(n)]
    if not names:
        raise ValueError(f"{kind}: this UNet has no such tensors")
    return names


def _register(kind: str) -> None:
    description, _ = COMPONENTS[kind]

    def component(ctx: ReleaseContext, config: NoConfig, prior: Release | None) -> Release:
        guard = Guard.from_names(ctx.model.unet, component_names(ctx.model.unet, kind), method=kind)
        return Release(ctx.model, joined(prior, ctx.model, guard, method=kind), dict(prior.info) if prior else {})

    register(kind, description=f"Component freezing: {description}.")(component)


for _kind in COMPONENTS:
    _register(_kind)
