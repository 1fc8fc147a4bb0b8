"""Tiny Stable-Diffusion-format models built offline from configs.

The same classes as SD 1.5 (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, a diffusers
scheduler), only small: tests use them randomly initialised, and the embedded default is one of them
trained by the project's recipe. Nothing here touches a model hub.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .model import DiffusionModel

# A small default vocabulary: enough whole-word tokens for tests; any other word falls back to characters.
DEFAULT_WORDS = (
    "a an the of and in with emoji photo style person man woman people",
    "red green blue yellow white black cat dog tree house car flag food",
)


@dataclass
class TinySpec:
    """Architecture of a tiny SD-format model. Defaults: a pixel-space 16x16 model that builds in < 1 s."""

    resolution: int = 16
    latent: bool = False  # True: an AutoencoderKL with `vae_channels`, UNet works at resolution / 2**(levels-1)
    block_out_channels: tuple[int, ...] = (16, 32)
    cross_attention: tuple[bool, ...] = (False, True)  # per level, down path order
    layers_per_block: int = 1
    attention_heads: int = 1  # diffusers' attention_head_dim acts as the number of heads
    norm_num_groups: int = 8
    text_hidden_size: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate_size: int = 64
    max_length: int = 16
    vae_channels: tuple[int, ...] = (16, 32)
    latent_channels: int = 4
    prediction_type: str = "epsilon"
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    # texts the tokenizer's BPE merges are learned from: each of their words becomes one token
    words: tuple[str, ...] = field(default_factory=lambda: DEFAULT_WORDS)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        self.cross_attention = tuple(self.cross_attention)
        self.vae_channels = tuple(self.vae_channels)
        self.words = tuple(self.words)
        if len(self.cross_attention) != len(self.block_out_channels):
            raise ValueError("cross_attention needs one flag per UNet level (block_out_channels)")
        if not any(self.cross_attention):
            raise ValueError("at least one UNet level needs cross-attention, or text cannot condition the model")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _byte_level_tokenizer(max_length: int) -> Any:
    """A CLIPTokenizer with only byte-level characters: CLIP's normalizer and pre-tokenizer, no merges."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def train_bpe(texts: Sequence[str], max_length: int = 77) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE merges learned from `texts` until every word of them is one token.

    Deterministic (most frequent pair first, ties broken by the pair itself), unlike the tokenizers
    library's trainer, so the embedded model's recipe rebuilds the same vocabulary. Merges are applied to
    every word as they are learned, which is what makes applying them in rank order at encoding time
    reproduce whole words.
    """
    import heapq
    from collections import Counter

    base = _byte_level_tokenizer(max_length).backend_tokenizer
    freq: Counter[str] = Counter()
    for text in texts:
        normalized = base.normalizer.normalize_str(text)
        for piece, _ in base.pre_tokenizer.pre_tokenize_str(normalized):
            freq[piece] += 1
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(freq)]
    counts = [freq[w] for w in sorted(freq)]
    pairs: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pairs[pair] += counts[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-c, pair) for pair, c in pairs.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap:
        neg, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -neg or -neg <= 0:
            continue  # stale entry
        merges.append(pair)
        merged = pair[0] + pair[1]
        for i in sorted(where.pop(pair, ())):
            symbols = words[i]
            for old in zip(symbols, symbols[1:]):
                pairs[old] -= counts[i]
                if old != pair and pairs[old] > 0:
                    heapq.heappush(heap, (-pairs[old], old))  # its count fell: re-rank it
            j, out = 0, []
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == pair:
                    out.append(merged)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            words[i] = out
            for new in zip(out, out[1:]):
                pairs[new] += counts[i]
                where.setdefault(new, set()).add(i)
                heapq.heappush(heap, (-pairs[new], new))
        pairs.pop(pair, None)
    vocab = dict(base.get_vocab())
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab, merges


def build_clip_tokenizer(texts: Sequence[str], max_length: int) -> Any:
    """A CLIPTokenizer (SD's class) whose BPE merges, learned from `texts`, make each of their words one
    token; other text falls back to byte-level pieces. Captions longer than `max_length` are refused here,
    so no training caption is silently truncated."""
    from transformers import CLIPTokenizer

    vocab, merges = train_bpe(texts, max_length)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    longest = max((len(tok(t).input_ids) for t in texts), default=0)
    if longest > max_length:
        raise ValueError(f"a text needs {longest} tokens, more than max_length={max_length}")
    return tok


def build_tiny_model(spec: TinySpec | None = None, *, seed: int = 0) -> DiffusionModel:
    """A randomly initialised DiffusionModel of SD's classes, seeded."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = spec or TinySpec()
    tokenizer = build_clip_tokenizer(spec.words, spec.max_length)
    levels = len(spec.block_out_channels)
    down = tuple("CrossAttnDownBlock2D" if x else "DownBlock2D" for x in spec.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(spec.cross_attention))
    vae_levels = len(spec.vae_channels)
    sample_size = spec.resolution // (2 ** (vae_levels - 1)) if spec.latent else spec.resolution
    if sample_size % (2 ** (levels - 1)):
        raise ValueError(f"sample size {sample_size} is not divisible by 2**{levels - 1} (UNet levels)")
    channels = spec.latent_channels if spec.latent else 3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=channels,
            out_channels=channels,
            down_block_types=down,
            up_block_types=up,
            mid_block_type="UNetMidBlock2DCrossAttn" if spec.cross_attention[-1] else None,
            block_out_channels=spec.block_out_channels,
            layers_per_block=spec.layers_per_block,
            attention_head_dim=spec.attention_heads,
            norm_num_groups=spec.norm_num_groups,
            cross_attention_dim=spec.text_hidden_size,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=spec.text_hidden_size,
                intermediate_size=spec.text_intermediate_size,
                num_hidden_layers=spec.text_layers,
                num_attention_heads=spec.text_heads,
                max_position_embeddings=spec.max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        vae = None
        if spec.latent:
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * vae_levels,
                up_block_types=("UpDecoderBlock2D",) * vae_levels,
                block_out_channels=spec.vae_channels,
                latent_channels=spec.latent_channels,
                norm_num_groups=spec.norm_num_groups,
                sample_size=spec.resolution,
            )
    scheduler = DDIMScheduler(
        num_train_timesteps=spec.num_train_timesteps,
        beta_schedule=spec.beta_schedule,
        prediction_type=spec.prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    model = DiffusionModel(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae)
    for module in model.modules():
        module.eval()
        module.requires_grad_(False)
    return model


def write_tiny_model(path: str | Path, spec: TinySpec | None = None, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Build a tiny random model and save it as a Stable-Diffusion-format directory."""
    return build_tiny_model(spec, seed=seed).save_pretrained(path, overwrite=overwrite)
