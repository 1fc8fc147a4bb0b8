"""Training configuration, shared by the Python API and the CLI."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

# What a freeze ratio counts, everywhere (API, CLI, configs, bench): "params", a share of the UNet's
# parameters (what freezing saves in compute and what a frozen share means to a user), or "count", a share of
# its tensors (the paper's unit).
RATIO_UNITS = ("params", "count")
RATIO_BY_DEFAULT = "params"


def check_ratio_by(value: str, what: str = "ratio_by") -> None:
    if value not in RATIO_UNITS:
        raise ValueError(f"{what} must be one of {RATIO_UNITS}, got {value!r}")


OPTIMIZERS = ("adamw", "adam", "sgd")
MIXED_PRECISION = ("no", "fp16", "bf16")
# Schedules of diffusers.optimization.get_scheduler that need no extra arguments.
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")

# Fields that may change between a checkpoint and the run resuming it without changing the result of the
# steps already taken.
RESUMABLE_CHANGES = frozenset({"max_steps", "checkpoint_every", "checkpoints_total_limit", "log_every",
                               "progress", "num_workers"})


@dataclass
class TrainConfig:
    """One training run of the core loop.

    The global batch is batch_size x processes x gradient_accumulation; data order, augmentation and noise
    depend on the global batch only, so 1 process x 2 accumulation steps and 2 processes x 1 step train
    the same model.
    """

    max_steps: int = 100
    batch_size: int = 16  # per process and micro-step
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    sgd_momentum: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    ema_decay: float | None = None  # None: no EMA; else the final weights are the EMA weights
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 0  # 0: only the final checkpoint
    checkpoints_total_limit: int = 2
    log_every: int = 10
    progress: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive(name: str) -> None:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")

        for name in ("max_steps", "batch_size", "gradient_accumulation", "checkpoints_total_limit", "log_every"):
            positive(name)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"TrainConfig.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"TrainConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        # `not x > 0` rather than `x <= 0`: NaN compares false both ways and must be refused, as must inf
        # (one JSON config with lr 1e999 would otherwise turn every weight into NaN after the first step).
        for name in ("learning_rate", "adam_epsilon"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number > 0, got {value}")
        for name in ("weight_decay", "sgd_momentum"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {value}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {value}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"TrainConfig.max_grad_norm must be a finite number > 0 or None, got {self.max_grad_norm}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if self.checkpoint_every < 0 or self.lr_warmup_steps < 0 or self.num_workers < 0:
            raise ValueError("checkpoint_every, lr_warmup_steps and num_workers must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return strict_from_dict(cls, data)


def merge_nested(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, section by section: a nested dict in `over` changes only the fields it names."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge_nested(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def from_partial(cls: Any, data: dict[str, Any]) -> Any:
    """`cls` from a dict that may name only some fields, nested sections included: the rest keep `cls`'s own
    defaults (`{"warm_start": {"max_steps": 9}}` keeps the warm start's other defaults, not TrainConfig's)."""
    return cls.from_dict(merge_nested(cls().to_dict(), data))


class JsonConfig:
    """to_dict / from_dict for a config dataclass: JSON-like data in and out, unknown fields refused."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        return strict_from_dict(cls, data)


def strict_from_dict(cls: Any, data: dict[str, Any], convert: Any = None) -> Any:
    """Build a config dataclass from JSON-like data; an unknown field is an error, not silently ignored
    (a typo in a config file must not fall back to a default)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**({k: convert(v) for k, v in data.items()} if convert else data))
