"""Textual inversion: the reference attack outside the publisher's path.

The attacker learns a new word per protected concept (one token embedding each, initialised from a generic
word) on its own images, and prompts with it; the UNet is not touched. A UNet guard cannot stop this by design,
whatever it freezes: the benchmark reports what it reaches on each release so that nobody reads a guard's
mitigation as protection against it. Released values that change what the UNet does with the text (immunised
cross-attention keys and values) may still change what the new word can draw, which is what the report shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..configs import TrainConfig
from .captions import recaptioner
from .config import AttackConfig

INIT_WORD = "person"  # what a new word starts from: a coarse description, not the concept's unlearned name


def token_names(concepts: Sequence[str]) -> dict[str, str]:
    """Protected concept -> the new word that stands for it (a token no tokenizer knows)."""
    return {c: f"<concept-{i}>" for i, c in enumerate(dict.fromkeys(concepts))}


def add_tokens(model: Any, words: Sequence[str]) -> list[int]:
    """Add `words` to the model's tokenizer as whole tokens, each embedding initialised from INIT_WORD's."""
    tokenizer = model.tokenizer
    existing = [w for w in words if w in tokenizer.get_vocab()]
    if existing:
        raise ValueError(f"textual inversion: the tokenizer already has {existing}")
    tokenizer.add_tokens(list(words))
    model.text_encoder.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(list(words))
    init = tokenizer(INIT_WORD, add_special_tokens=False).input_ids
    weight = model.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        start = weight[init].mean(0)
        for i in ids:
            weight[i] = start
    return list(ids)


def run_textual_inversion(model: Any, config: AttackConfig, data: Any, names: dict[str, str], *, seed: int,
                          steps: int | None = None, callbacks: Sequence[Any] = (), progress: bool = True) -> Any:
    """Learn one embedding per new word of `names` on `data` (captions rewritten to the new words), in place;
    every other weight of the model stays as it is."""
    from ..objective import DenoisingObjective
    from ..training import train

    ids = add_tokens(model, list(names.values()))
    embedding = model.text_encoder.get_input_embeddings().weight
    keep = torch.zeros(embedding.shape[0], 1, dtype=embedding.dtype)
    keep[ids] = 1.0
    embedding.requires_grad_(True)  # the training core keeps it so; the hook needs it now
    hook = embedding.register_hook(lambda g: g * keep.to(g.device))
    objective = DenoisingObjective(model)
    cfg = TrainConfig(max_steps=steps or config.steps, batch_size=config.batch_size, learning_rate=config.lr,
                      optimizer="adamw", weight_decay=0.0, seed=seed, progress=progress)
    try:
        return train(objective, data.recaptioned(recaptioner(names)), {"text_encoder.token_embedding": embedding},
                     cfg, callbacks=list(callbacks), desc="textual inversion")
    finally:
        hook.remove()
        embedding.requires_grad_(False)
