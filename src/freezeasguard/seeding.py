"""Deterministic seed derivation.

Every random draw of a training run (data order, augmentation, noise, timesteps) is a pure function of the
run's seed, the step and the sample's position in the global batch. That is what makes a resumed run
bit-identical to an uninterrupted one without saving RNG states, and makes N processes draw the same noise
for a sample as one process does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed mixed from `seed` and integer `keys` (order matters); valid for torch.Generator."""
    x = _splitmix64(seed & _MASK64)
    for k in keys:
        x = _splitmix64(x ^ (k & _MASK64))
    return x & ((1 << 63) - 1)


# Stream identifiers, so the same per-sample seed feeds independent streams. Every stream of the project is
# named here, and tests/test_training.py checks that no two share a value.
STREAM_ORDER = 1  # the training core's data order
STREAM_AUGMENT = 2  # augmentation
STREAM_NOISE = 3  # diffusion noise and timesteps
STREAM_GLOBAL = 4  # torch's global RNG inside a step (dropout)
STREAM_ADAPTER = 5  # LoRA initialisation
STREAM_RANKING = 6  # the guard learner's ranking check
STREAM_MASK = 8  # the guard learner's mask batches
STREAM_LEARN_SAMPLE = 9  # the guard learner's fixed probe example
STREAM_PROTECTION_BATCHES = 77  # batches a protection draws from the publisher's data
STREAM_ATTACK_RATE = 91  # immunisation's simulated attacker's learning rate per restart
STREAM_ATTACK_WORDS = 92  # an attack's made-up names for the protected concepts
STREAM_ATTACK_DATA = 93  # which of its images an attack with a data share keeps
STREAM_ATTACK_HORIZON = 94  # immunisation's simulated attacker's steps before its next restart
STREAM_ATTACK_OPTIMIZER = 95  # immunisation's simulated attacker's optimizer per restart
STREAM_ATTACK_CAPTIONS = 96  # immunisation's simulated attacker's made-up captions per restart
STREAM_SELECT_RATE = 97  # immunise-select's simulated attackers' learning rates


def streams() -> dict[str, int]:
    """Every named stream: name -> value."""
    return {k: v for k, v in globals().items() if k.startswith("STREAM_") and isinstance(v, int)}


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Run code that draws from torch's global RNG (peft's LoRA initialisation does) from `seed`, then restore
    the caller's RNG state: the draws are reproducible and the caller's own stream is not disturbed."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield
