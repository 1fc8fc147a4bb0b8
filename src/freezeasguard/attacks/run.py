"""Running an attack through the publisher's guarded fine-tuning path.

`check_attack` refuses, before any work, an attack the path would refuse (LoRA on a module that owns a frozen
tensor, text-encoder training under a guard that forbids it); `attack_data` gives the attacker's images with
its captions; `run_attack` fine-tunes a release with it (`finetune`, so the guard is enforced and audited).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..configs import TrainConfig
from ..finetuning import FinetuneConfig, GuardViolation, finetune, resolve_lora_targets
from ..seeding import STREAM_ATTACK_DATA, derive_seed
from .captions import concept_names, leaks, recaptioner
from .config import LORA_TARGETS, AttackConfig


def lora_modules(unet: Any, config: AttackConfig, guard: Any) -> list[str]:
    """The full names of the modules the attack adapts. A target family covers only what the guard leaves
    trainable; explicit `lora_modules` that own a frozen tensor are refused (GuardViolation, naming them)."""
    if config.lora_modules:
        chosen, _ = resolve_lora_targets(unet, config.lora_modules, guard, skip_frozen=False)
        return chosen
    chosen, _ = resolve_lora_targets(unet, LORA_TARGETS[config.lora_targets], guard, skip_frozen=True)
    return chosen


def check_attack(config: AttackConfig, guard: Any, unet: Any) -> None:
    """Refuse what the guarded path would refuse, before any work (GuardViolation names the module).
    Textual inversion runs outside the path, so nothing of it is refused."""
    if config.method == "textual-inversion":
        return
    if config.train_text_encoder and guard is not None and not guard.allow_text_encoder:
        raise GuardViolation("this guard keeps the text encoder frozen (allow_text_encoder is false): an attack "
                             "that trains text_encoder is refused")
    if config.method == "lora":
        lora_modules(unet, config, guard)


def finetune_config(config: AttackConfig, modules: Sequence[str] | None, *, seed: int, steps: int | None = None,
                    progress: bool = True) -> FinetuneConfig:
    """The guarded path's FinetuneConfig for `config` (`steps` overrides its budget)."""
    sgd = config.optimizer == "sgd"
    # SGD without weight decay: coupled decay would shrink only the trainable weights, a confound between a
    # guarded and an unguarded run that has nothing to do with the guard. AdamW keeps the default user's decay.
    train = TrainConfig(max_steps=steps or config.steps, batch_size=config.batch_size, learning_rate=config.lr,
                        optimizer=config.optimizer, sgd_momentum=config.sgd_momentum if sgd else 0.0,
                        weight_decay=0.0 if sgd else TrainConfig().weight_decay,
                        lr_schedule="cosine" if config.schedule == "cosine" else
                        ("constant_with_warmup" if config.warmup_steps else "constant"),
                        lr_warmup_steps=config.warmup_steps, seed=seed, progress=progress)
    if config.method == "full":
        return FinetuneConfig(method="full", train=train, train_text_encoder=config.train_text_encoder)
    return FinetuneConfig(method="lora", train=train, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                          lora_targets=tuple(modules or ()), skip_frozen_targets=False,
                          train_text_encoder=config.train_text_encoder)


def attack_data(config: AttackConfig, illegal: Any, legal: Any, *, seed: int, concepts: Iterable[str] = (),
                publisher_captions: Iterable[str] = ()) -> tuple[Any, dict[str, str]]:
    """The images the attacker fine-tunes on, captioned its way, and what it calls each protected concept
    (the same names go into the prompts its images are judged on)."""
    concepts = list(concepts)
    if config.data == "benign":
        return legal, {c: c for c in concepts}
    if config.method == "textual-inversion":
        from .textual_inversion import token_names

        if not concepts:
            raise ValueError("textual inversion needs the protected concepts' names (what its new words replace)")
        return illegal, token_names(concepts)  # run_textual_inversion rewrites the captions after adding the words
    data = illegal
    if config.data_share < 1.0:
        n = max(1, round(config.data_share * len(data)))
        order = sorted(range(len(data)), key=lambda i: derive_seed(seed, STREAM_ATTACK_DATA, i))
        data = data.subset(sorted(order[:n]))
    names = concept_names(config.captions, concepts, seed=seed, publisher_captions=publisher_captions)
    if config.captions != "given":
        if not concepts:
            raise ValueError(f"{config.captions} captions need the protected concepts' names")
        data = data.recaptioned(recaptioner(names))
        leaked = leaks(data.captions, concepts)
        if leaked:
            raise ValueError(f"{config.captions} captions still name a protected concept: {leaked[:3]}")
    return data, names


def run_attack(model: Any, guard: Any, config: AttackConfig, data: Any, *, seed: int, steps: int | None = None,
               callbacks: Sequence[Any] = (), output_dir: Any = None, progress: bool = True,
               names: dict[str, str] | None = None) -> Any:
    """Fine-tune `model` in place on `data` with the attack, through the guarded path (textual inversion:
    outside it, learning the new words of `names`); returns the training result."""
    if config.method == "textual-inversion":
        from .textual_inversion import run_textual_inversion

        if not names:
            raise ValueError("textual inversion needs the new words (names from attack_data)")
        return run_textual_inversion(model, config, data, names, seed=seed, steps=steps, callbacks=callbacks,
                                     progress=progress)
    check_attack(config, guard, model.unet)
    modules = lora_modules(model.unet, config, guard) if config.method == "lora" else None
    cfg = finetune_config(config, modules, seed=seed, steps=steps, progress=progress)
    return finetune(model, data, guard=guard, config=cfg, callbacks=list(callbacks), output_dir=output_dir)
