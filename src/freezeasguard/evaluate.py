"""Recognition of generated images: does a model draw the identity (or style) it is prompted with?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .model import DiffusionModel
from .recogniser import Recogniser


@dataclass
class SamplingConfig:
    num_inference_steps: int = 25
    guidance_scale: float = 3.0
    sampler: str = "ddim"
    batch_size: int = 128


def recognise(
    recogniser: Recogniser, images: torch.Tensor, targets: Sequence[str], *, head: str = "identity"
) -> dict[str, Any]:
    """Rate at which top-1 of `head` equals the target, and mean probability of the target (images in [0, 1])."""
    classes = recogniser.config.identities if head == "identity" else recogniser.config.styles
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({t for t in targets if t not in index})
    if unknown:
        raise ValueError(f"recogniser has no {head} class for {unknown[:5]}")
    pred = recogniser.predict(images)[head]
    y = torch.tensor([index[t] for t in targets])
    hits = (pred.argmax(-1) == y).float()
    prob = pred[torch.arange(len(y)), y]
    return {"rate": float(hits.mean()), "mean_prob": float(prob.mean()), "n": len(y), "hits": hits, "prob": prob}


def sample_and_recognise(
    model: DiffusionModel,
    recogniser: Recogniser,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    head: str = "identity",
    seed: int = 0,
    sampling: SamplingConfig | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    s = sampling or SamplingConfig()
    images = model.sample(list(prompts), seed=seed, num_inference_steps=s.num_inference_steps,
                          guidance_scale=s.guidance_scale, sampler=s.sampler, batch_size=s.batch_size)
    return recognise(recogniser, images, targets, head=head), images
