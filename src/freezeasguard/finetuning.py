"""Guarded fine-tuning: the publisher's path for users, full or LoRA, on the one training core.

The guard is enforced three times: frozen tensors never reach the optimizer (and have requires_grad off),
LoRA adapters are never placed on a module that owns a frozen tensor, and after training every frozen
tensor is checked bit-identical to the guard's record before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .audit import AuditReport, check_lora, check_tensors
from .configs import strict_from_dict
from .errors import FreezeAsGuardError
from .guard import Guard, unet_tensors
from .model import DiffusionModel
from .objective import DenoisingObjective, EncodedDataset
from .seeding import STREAM_ADAPTER, derive_seed, seeded_global_rng
from .training import TrainCallback, TrainConfig, TrainResult, make_accelerator, train
from .utils.files import atomic_directory, atomic_write_json, canonical_digest, claim_output_dir

METHODS = ("full", "lora")
# diffusers' own LoRA recipe for SD (train_text_to_image_lora.py) adapts the attention projections.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def attacker_train_config() -> TrainConfig:
    """The user fine-tune a guard is evaluated against (the quick benchmark's and the demo's): 400 AdamW steps of
    batch 32 at lr 1e-4. It is FinetuneConfig's default, so a default run is the attack the published numbers
    measured, not a weaker one that would overstate the protection."""
    return TrainConfig(max_steps=400, batch_size=32, learning_rate=1e-4, optimizer="adamw")


class GuardViolation(FreezeAsGuardError):
    """Fine-tuning would break the guard (or did, and nothing was written)."""


@dataclass
class FinetuneConfig:
    method: str = "full"
    train: TrainConfig = field(default_factory=attacker_train_config)
    lora_rank: int = 4
    lora_alpha: float | None = None  # None: equal to the rank (scale 1)
    lora_targets: tuple[str, ...] | None = None  # None: DEFAULT_LORA_TARGETS, frozen modules skipped
    skip_frozen_targets: bool = False  # with explicit lora_targets: skip frozen modules instead of failing
    caption_dropout: float = 0.0
    cache_encodings: bool = True  # encode images (and, with a frozen text encoder, captions) once
    train_text_encoder: bool = False  # refused under a guard that does not allow it

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if self.method not in METHODS:
            raise ValueError(f"fine-tuning method must be one of {METHODS}, got {self.method!r}")
        if self.lora_rank < 1:
            raise ValueError("lora_rank must be >= 1")
        if self.lora_targets is not None:
            self.lora_targets = tuple(self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        return strict_from_dict(cls, data)


@dataclass
class TrainableShare:
    """How much of one model component a run trains. For LoRA the trained tensors are the adapter's, counted
    against the UNet they adapt (so the parameter share is the adapter's size relative to the UNet)."""

    tensors: int
    parameters: int
    trainable_tensors: int = 0
    trainable_parameters: int = 0

    @classmethod
    def of(cls, own: list[torch.Tensor], trained: list[torch.Tensor]) -> TrainableShare:
        return cls(len(own), sum(p.numel() for p in own), len(trained), sum(p.numel() for p in trained))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tensor_share": self.trainable_tensors / max(self.tensors, 1),
                "parameter_share": self.trainable_parameters / max(self.parameters, 1)}


@dataclass
class FinetuneResult:
    train: TrainResult
    audit: AuditReport | None
    unet: TrainableShare
    text_encoder: TrainableShare  # every text encoder together (SDXL: text_encoder and text_encoder_2)
    lora_modules: list[str]
    skipped_modules: list[str]
    output: Path | None

    @property
    def trainable_tensors(self) -> int:
        return self.unet.trainable_tensors + self.text_encoder.trainable_tensors

    @property
    def trainable_parameters(self) -> int:
        return self.unet.trainable_parameters + self.text_encoder.trainable_parameters

    def record(self) -> dict[str, Any]:
        return {
            "trainable_tensors": self.trainable_tensors,
            "trainable_parameters": self.trainable_parameters,
            "unet": self.unet.to_dict(),
            "text_encoder": self.text_encoder.to_dict(),
            "lora_modules": self.lora_modules,
            "skipped_modules": self.skipped_modules,
            "audit": self.audit.to_dict() if self.audit is not None else None,
            "metrics": self.train.metrics,
        }


def resolve_lora_targets(unet: Any, targets: tuple[str, ...] | None, guard: Guard | None,
                         skip_frozen: bool) -> tuple[list[str], list[str]]:
    """Full module names to adapt, and those skipped because they own frozen tensors.

    Matching follows peft: a target matches a module whose name equals it or ends with '.' + target.
    """
    explicit = targets is not None
    wanted = tuple(targets) if explicit else DEFAULT_LORA_TARGETS
    adaptable = (torch.nn.Linear, torch.nn.Conv2d)
    candidates = [
        name for name, module in unet.named_modules()
        if isinstance(module, adaptable) and any(name == t or name.endswith("." + t) for t in wanted)
    ]
    if not candidates:
        raise ValueError(f"no Linear/Conv2d module of the UNet matches the LoRA targets {list(wanted)}")
    frozen_owners = set()
    if guard is not None:
        frozen_owners = {n.rpartition(".")[0] for n in guard.frozen}
    skipped = [n for n in candidates if n in frozen_owners]
    if skipped and explicit and not skip_frozen:
        raise GuardViolation(
            f"{len(skipped)} LoRA target module(s) own tensors the guard freezes, e.g. {skipped[:5]}; "
            "choose other targets or allow skipping them (skip_frozen_targets=True / --skip-frozen-targets)"
        )
    chosen = [n for n in candidates if n not in frozen_owners]
    if not chosen:
        raise GuardViolation("every LoRA target module owns a frozen tensor: nothing is left to adapt")
    return chosen, skipped


def lora_state_dict(unet: Any) -> dict[str, torch.Tensor]:
    """The adapter weights in the format diffusers' `load_lora_weights` reads (`unet.<module>.lora.down.weight`)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {f"unet.{k}": v.detach().contiguous() for k, v in state.items()}


def finetune(
    model: DiffusionModel,
    data: Any,
    *,
    guard: Guard | None = None,
    config: FinetuneConfig | None = None,
    output_dir: str | Path | None = None,
    accelerator: Any = None,
    callbacks: Sequence[TrainCallback] = (),
    overwrite: bool = False,
) -> FinetuneResult:
    """Fine-tune `model` in place on `data` (a dataset of images and captions) under `guard`.

    Writes to `output_dir` (if given): checkpoints/ while training (rerun to resume), then `model/` (full)
    or `lora/pytorch_lora_weights.safetensors` (LoRA), `finetune.json` and `metrics.json`; nothing is
    written if the post-training audit finds a frozen tensor changed. The directory is owned by the run
    (`io.claim_output_dir`): another configuration's results or foreign files there are refused unless
    `overwrite`, and files the tool did not write are never deleted.
    """
    cfg = config or FinetuneConfig()
    products = ("checkpoints", "metrics.json", "finetune.json", "guard.json", "model" if cfg.method == "full" else "lora")
    identity = _run_identity(model, data, guard, cfg) if output_dir is not None else {}
    with claim_output_dir(output_dir, "finetune", identity, products, overwrite=overwrite,
                          main=getattr(accelerator, "is_main_process", None)):
        return _finetune(model, data, guard, cfg, output_dir, accelerator, callbacks)


def _finetune(model: DiffusionModel, data: Any, guard: Guard | None, cfg: FinetuneConfig,
              output_dir: str | Path | None, accelerator: Any, callbacks: Sequence[TrainCallback]) -> FinetuneResult:
    unet = model.unet
    if guard is not None:
        guard.apply(unet)  # fingerprint and frozen values must match the guard's base
    frozen = set(guard.frozen) if guard is not None else set()
    base = unet_tensors(unet)

    lora_modules: list[str] = []
    skipped: list[str] = []
    if cfg.method == "full":
        trainable = {f"unet.{n}": p for n, p in base.items() if n not in frozen}
    else:
        from peft import LoraConfig

        lora_modules, skipped = resolve_lora_targets(unet, cfg.lora_targets, guard, cfg.skip_frozen_targets)
        # peft draws the initial lora_A from the global RNG: seed it from the run, so --seed decides it
        with seeded_global_rng(derive_seed(cfg.train.seed, STREAM_ADAPTER)):
            unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                        init_lora_weights="gaussian", target_modules=lora_modules))
        trainable = {f"unet.{n}": p for n, p in unet.named_parameters() if ".lora_" in n}
        if guard is not None:
            landed = check_lora(guard, list(lora_state_dict(unet)))
            if not landed.compliant:  # peft placed an adapter we did not ask for
                raise GuardViolation("LoRA adapter on a frozen module: " + landed.describe(limit=5))
    if cfg.train_text_encoder:
        if guard is not None and not guard.allow_text_encoder:
            raise GuardViolation("this guard keeps the text encoder frozen (allow_text_encoder is false): "
                                 "fine-tune the UNet only")
        # every text encoder the model has (SDXL: both), under one rule: the guard allows them all or none
        for component, module in model.named_text_encoders():
            trainable.update({f"{component}.{n}": p for n, p in module.named_parameters()})
    if not trainable:
        raise GuardViolation("the guard freezes every UNet tensor: nothing can be fine-tuned")

    train_data = data
    if cfg.cache_encodings:
        with torch.no_grad():
            train_data = EncodedDataset(model, data, encode_text=not cfg.train_text_encoder)
    objective = DenoisingObjective(model, caption_dropout=cfg.caption_dropout)
    out = Path(output_dir) if output_dir is not None else None
    # Made here, not left to train(), so that under torchrun this function knows which process writes.
    accelerator = accelerator or make_accelerator(cfg.train.mixed_precision)
    stored = upcast_for_training(trainable, unet_tensors(unet)) if cfg.train.mixed_precision != "no" else {}
    result = train(objective, train_data, trainable, cfg.train, output_dir=out, accelerator=accelerator,
                   callbacks=callbacks, desc=f"finetune ({cfg.method}{', guarded' if guard is not None else ''})")
    with torch.no_grad():  # the derivative is stored as the release was
        for p, dtype in stored.values():
            p.data = p.data.to(dtype)

    report = None
    if guard is not None:
        report = check_tensors(guard, unet_tensors(unet), derivative="fine-tuned UNet")
        if cfg.method == "lora":
            lora_report = check_lora(guard, list(lora_state_dict(unet)), derivative="fine-tuned LoRA")
            report.findings.extend(lora_report.findings)
        if not report.compliant:
            raise GuardViolation("post-training audit failed, nothing written: " + report.describe(limit=5))

    ft = FinetuneResult(
        train=result, audit=report,
        unet=TrainableShare.of(list(base.values()), [p for n, p in trainable.items() if n.startswith("unet.")]),
        text_encoder=TrainableShare.of([p for m in model.text_encoders() for p in m.parameters()],
                                       [p for n, p in trainable.items() if not n.startswith("unet.")]),
        lora_modules=lora_modules, skipped_modules=skipped, output=None,
    )
    if out is not None:
        # One writer per output directory: the main process writes, the others wait until it is written.
        if accelerator.is_main_process:
            _save(model, cfg, guard, out)
            atomic_write_json(out / "finetune.json", {"config": cfg.to_dict(), "guard": guard.summary() if guard else None,
                                                      **ft.record()})
        accelerator.wait_for_everyone()
        ft.output = out / ("model" if cfg.method == "full" else "lora")
    return ft


def upcast_for_training(trainable: dict[str, torch.nn.Parameter], unet: dict[str, torch.nn.Parameter]) \
        -> dict[str, tuple[torch.nn.Parameter, torch.dtype]]:
    """Upcast to float32, in place, the tensors stored in half precision that training needs in full: every
    trainable one (diffusers' `cast_training_params`: the optimizer's steps and state in full precision while
    autocast computes in half) and every 1-D one, frozen or not (norms run in float32 under autocast and refuse
    half-precision weights beside a float32 input). Frozen matrices stay as stored and take half the memory.
    Returns name -> (tensor, storage dtype); casting back is exact for the frozen ones (they never change)."""
    stored = {}
    with torch.no_grad():
        for name, p in [*trainable.items(), *((f"unet.{n}", p) for n, p in unet.items() if p.dim() == 1)]:
            if name not in stored and p.dtype in (torch.float16, torch.bfloat16):
                stored[name] = (p, p.dtype)
                p.data = p.data.float()
    return stored


def _save(model: DiffusionModel, cfg: FinetuneConfig, guard: Guard | None, out: Path) -> Path:
    if cfg.method == "full":
        dest = model.save_pretrained(out / "model", overwrite=True)
    else:
        from safetensors.torch import save_file

        with atomic_directory(out / "lora", overwrite=True) as tmp:
            save_file(lora_state_dict(model.unet), str(tmp / "pytorch_lora_weights.safetensors"),
                      metadata={"format": "pt", "lora_rank": str(cfg.lora_rank),
                                "lora_alpha": str(cfg.lora_alpha or cfg.lora_rank)})
        dest = out / "lora"
    if guard is not None:
        guard.save(out / "guard.json")
    return dest


def _run_identity(model: DiffusionModel, data: Any, guard: Guard | None, cfg: FinetuneConfig) -> dict[str, Any]:
    """What must be equal for a rerun into the same output directory to continue the earlier run."""
    from .configs import RESUMABLE_CHANGES
    from .guard import fingerprint_of

    config = cfg.to_dict()
    config["train"] = {k: v for k, v in config["train"].items() if k not in RESUMABLE_CHANGES}
    manifest = getattr(data, "manifest", None)
    return {"config": config, "base": fingerprint_of(unet_tensors(model.unet))["digest"],
            "guard": guard.digest() if guard is not None else None,
            "data": canonical_digest(manifest()) if manifest is not None else {"items": len(data)}}
