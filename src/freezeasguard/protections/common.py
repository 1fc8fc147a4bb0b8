"""What several protections share: the denoising objective on the publisher's data, seeded batches, and the
rule for joining a stage's frozen set to the release before it."""

from __future__ import annotations

from typing import Any

import torch

from ..guard import Guard
from ..seeding import STREAM_PROTECTION_BATCHES, derive_seed
from .registry import Release


def objective_of(model: Any) -> Any:
    from ..objective import DenoisingObjective

    return DenoisingObjective(model)


def encoded(model: Any, data: Any) -> Any:
    from ..objective import EncodedDataset

    with torch.no_grad():
        return EncodedDataset(model, data)


def seeded_batch(data: Any, b: int, batch_size: int, seed: int, stream: int = 0) -> dict[str, Any]:
    """Collated batch `b`, every sample a function of (seed, stream, batch, position) alone."""
    examples = []
    for i in range(batch_size):
        s = derive_seed(seed, STREAM_PROTECTION_BATCHES, stream, b, i)
        ex = dict(data.example(s % len(data), s))
        ex["seeds"] = s
        examples.append(ex)
    return data.collate(examples)


def seeded_batches(data: Any, n_batches: int, batch_size: int, seed: int, stream: int = 0) -> list[dict[str, Any]]:
    """`n_batches` collated batches (`seeded_batch` 0 .. n_batches - 1)."""
    return [seeded_batch(data, b, batch_size, seed, stream) for b in range(n_batches)]


def joined(prior: Release | None, model: Any, guard: Guard, *, method: str) -> Guard:
    """`guard` on top of the release before it: the union of both frozen sets, fingerprinted on `model`."""
    if prior is None or prior.guard is None:
        return guard
    return Guard.from_names(model.unet, sorted(set(prior.guard.frozen) | set(guard.frozen)), method=method,
                            provenance={**prior.guard.provenance, **guard.provenance})
