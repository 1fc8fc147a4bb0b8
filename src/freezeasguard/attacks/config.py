"""What an attack is, as data (torch-free): the user's fine-tuning configuration that a release is measured
against. The publisher's guarded fine-tuning path runs every attack, so an attack can change only what that
path lets a user change: the fine-tuning method (full, or LoRA on what the guard leaves trainable), the
optimizer, learning rate, schedule, steps and batch, which images, and how they are captioned."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..configs import strict_from_dict

# "textual-inversion" learns a new word per protected concept and leaves the UNet alone: a reference attack
# outside the publisher's path (registered, never in the battery's worst case).
METHODS = ("full", "lora", "textual-inversion")
# LoRA target families. "attention": diffusers' own LoRA recipe (the attention projections); "locon": kohya's
# LoCon, every convolution and feed-forward layer too (LoRA on what a full fine-tune would train).
LORA_TARGETS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "locon": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
              "conv1", "conv2", "conv_shortcut", "conv_in", "conv_out", "time_emb_proj", "conv"),
}
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine")
# Which images the attacker fine-tunes on: its own images of the protected concepts, or only benign (legal)
# images, scored on the protected prompts (concept resurgence: a relearn without a single protected image).
DATA = ("illegal", "benign")
# How the attacker captions its images, and so which words the evaluation prompts use: "given" (the words the
# publisher's captions use), "renamed" (each protected concept called by a made-up word the publisher never
# used), "synonym" (another ordinary word for it).
CAPTIONS = ("given", "renamed", "synonym")


@dataclass(frozen=True)
class AttackConfig:
    method: str = "full"
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: equal to the rank
    lora_targets: str = "attention"  # a LORA_TARGETS family, on the modules the guard leaves trainable
    # Explicit module names (or suffixes) to adapt instead of a family: one that owns a frozen tensor is refused
    # before any work, as the publisher's path would refuse it.
    lora_modules: tuple[str, ...] = field(default_factory=tuple)
    train_text_encoder: bool = False  # refused under a guard that keeps the text encoder frozen
    optimizer: str = "adamw"
    lr: float = 1e-4
    sgd_momentum: float = 0.9
    schedule: str = "constant"
    warmup_steps: int = 0
    steps: int = 400
    batch_size: int = 32
    data: str = "illegal"
    data_share: float = 1.0  # share of the attacker's images it has (seeded choice), in (0, 1]
    captions: str = "given"
    curve: tuple[int, ...] = field(default_factory=tuple)  # extra steps evaluated along the run (one run)

    def __post_init__(self) -> None:
        object.__setattr__(self, "curve", tuple(int(s) for s in self.curve))
        object.__setattr__(self, "lora_modules", tuple(str(m) for m in self.lora_modules))
        for name, allowed in (("method", METHODS), ("lora_targets", tuple(LORA_TARGETS)), ("optimizer", OPTIMIZERS),
                              ("schedule", SCHEDULES), ("data", DATA), ("captions", CAPTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"AttackConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("lora_rank", "steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AttackConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "sgd_momentum", "data_share"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"AttackConfig.{name} must be a finite number, got {value}")
        if not self.lr > 0:
            raise ValueError(f"AttackConfig.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.sgd_momentum < 1.0:
            raise ValueError(f"AttackConfig.sgd_momentum must be in [0, 1), got {self.sgd_momentum}")
        if not 0.0 < self.data_share <= 1.0:
            raise ValueError(f"AttackConfig.data_share must be in (0, 1], got {self.data_share}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"AttackConfig.warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if any(not 0 < s < self.steps for s in self.curve):
            raise ValueError(f"AttackConfig.curve steps must be in (0, steps={self.steps}), got {list(self.curve)}")
        if self.method == "textual-inversion" and (self.captions != "given" or self.data == "benign"):
            raise ValueError("textual inversion names the protected concepts by its own new words, on the "
                             "attacker's images: captions 'given' and data 'illegal'")
        if self.data == "benign" and self.captions != "given":
            raise ValueError("a benign attack uses no protected image, so it has no protected caption to change")

    def changes_the_legal_user(self, default: AttackConfig) -> bool:
        """Whether a legal user following this attack's recipe would train differently from the default user
        (another rate, optimizer, schedule or LoRA): then the legal users' impact is measured under it too."""
        keys = ("method", "lora_rank", "lora_alpha", "lora_targets", "lora_modules", "optimizer", "lr", "sgd_momentum",
                "schedule", "warmup_steps", "batch_size", "train_text_encoder")
        return any(getattr(self, k) != getattr(default, k) for k in keys)

    def scaled_to(self, default: AttackConfig, *, steps: int, lr: float, batch_size: int) -> AttackConfig:
        """This attack relative to another default attacker (a profile's budget): steps, warm-up and curve
        scaled by steps / default.steps, the rate by lr / default.lr, and the default's batch replaced. So
        'lr x5' stays five times the profile's rate, whatever the profile's budget."""
        k = steps / default.steps
        new_steps = max(1, round(self.steps * k))
        curve = tuple(sorted({round(s * k) for s in self.curve} - {0} - {new_steps}))
        curve = tuple(s for s in curve if 0 < s < new_steps)
        warmup = min(round(self.warmup_steps * k), new_steps - 1)
        return replace(self, steps=new_steps, curve=curve, warmup_steps=warmup, lr=self.lr * (lr / default.lr),
                       batch_size=batch_size if self.batch_size == default.batch_size else self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["curve"] = list(self.curve)
        d["lora_modules"] = list(self.lora_modules)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttackConfig:
        return strict_from_dict(cls, data)

    def with_changes(self, **changes: Any) -> AttackConfig:
        return replace(self, **changes)
