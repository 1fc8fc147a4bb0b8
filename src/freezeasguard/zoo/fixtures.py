"""Random-initialised model directories with the exact component configurations of released models.

SD 1.5, SD 2.1 (768 px, v-prediction) and SDXL base 1.0: the UNet, VAE, text encoder(s), tokenizer(s),
scheduler and model_index.json as their hub snapshots hold them (`architectures.json`, which also says where
each configuration was read), laid out as a snapshot is, weights in safetensors only. Nothing is downloaded:
the values are random, the shapes and tensor names are the real ones.

`width_divisor` divides every width (channels, hidden and intermediate sizes, projections, the cross-attention
and added-embedding dimensions) and keeps the rest of the structure: block types, layer counts, attention
heads, transformer depths, which text encoder feeds what, tensor names. A divisor that would leave a width
that does not split into its attention heads is refused, with the divisors that fit. GroupNorm's group count
becomes the largest that still divides every width (it shapes no tensor).
"""

from __future__ import annotations

import copy
import importlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ARCHITECTURES = ("sd15", "sd21", "sdxl")
_DATA = Path(__file__).with_name("architectures.json")
# Components with weights, in the order they are built (and so drawn from the seeded generator).
_WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2", "safety_checker")
_TOKENIZERS = ("tokenizer", "tokenizer_2")
# Texts the offline tokenizers learn their merges from: each word becomes one token, as in CLIP's vocabulary.
TOKENIZER_WORDS = (
    "a an the of and in with on at by for to from photo picture painting drawing style portrait person man",
    "woman people face cat dog tree house car flag food red green blue yellow white black bright dark emoji",
)
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def architecture(arch: str) -> dict[str, Any]:
    """The recorded configurations of one architecture (a copy): components, model_index, sources."""
    data = json.loads(_DATA.read_text())["architectures"]
    if arch not in data:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return copy.deepcopy(data[arch])


class _Widths:
    """Divides widths by the divisor, collecting every width that does not survive it."""

    def __init__(self, divisor: int) -> None:
        self.divisor = divisor
        self.problems: list[str] = []

    def div(self, where: str, value: int) -> int:
        if value % self.divisor:
            self.problems.append(f"{where}={value} is not a multiple of {self.divisor}")
            return max(1, value // self.divisor)
        return value // self.divisor

    def heads(self, where: str, width: int, heads: int) -> None:
        if width % heads:
            self.problems.append(f"{where}: width {width} does not split into {heads} attention heads")


def _scale_unet(cfg: dict[str, Any], w: _Widths) -> None:
    channels = [w.div(f"unet.block_out_channels[{i}]", c) for i, c in enumerate(cfg["block_out_channels"])]
    cfg["block_out_channels"] = channels
    cfg["cross_attention_dim"] = w.div("unet.cross_attention_dim", cfg["cross_attention_dim"])
    for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        if cfg.get(key):
            cfg[key] = w.div(f"unet.{key}", cfg[key])
    # diffusers reads attention_head_dim as the number of heads when num_attention_heads is unset (SD's configs)
    heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    for i, kind in enumerate(cfg["down_block_types"]):
        if "CrossAttn" in kind:
            w.heads(f"unet level {i}", channels[i], heads[i])
    w.heads("unet mid block", channels[-1], heads[-1])
    cfg["norm_num_groups"] = math.gcd(cfg.get("norm_num_groups", 32), *channels)


def _scale_vae(cfg: dict[str, Any], w: _Widths) -> None:
    channels = [w.div(f"vae.block_out_channels[{i}]", c) for i, c in enumerate(cfg["block_out_channels"])]
    cfg["block_out_channels"] = channels
    cfg["norm_num_groups"] = math.gcd(cfg.get("norm_num_groups", 32), *channels)


def _scale_text(cfg: dict[str, Any], w: _Widths, where: str) -> None:
    for key in ("hidden_size", "intermediate_size", "projection_dim"):
        if key in cfg:
            cfg[key] = w.div(f"{where}.{key}", cfg[key])
    w.heads(where, cfg["hidden_size"], cfg.get("num_attention_heads", 8))


def configs(arch: str, width_divisor: int = 1, resolution: int | None = None) -> dict[str, Any]:
    """The architecture's recorded configurations with every width divided by `width_divisor` and, with
    `resolution`, the UNet's and VAE's sample sizes set for images of that side (pixels)."""
    if isinstance(width_divisor, bool) or not isinstance(width_divisor, int) or width_divisor < 1:
        raise ValueError(f"width_divisor must be a positive int, got {width_divisor!r}")
    spec = architecture(arch)
    problems = _scale(spec, width_divisor)
    if problems:
        fits = ", ".join(str(d) for d in fitting_divisors(arch))
        raise ValueError(f"width divisor {width_divisor} does not fit {arch} ({spec['name']}): "
                         f"{'; '.join(problems[:4])}. Divisors that fit {arch}: {fits}")
    if resolution is not None:
        factor = 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
        multiple = factor * 2 ** (len(spec["unet"]["block_out_channels"]) - 1)
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < multiple or resolution % multiple:
            raise ValueError(f"resolution must be a positive multiple of {multiple} for {arch} (the VAE's and the "
                             f"UNet's downsampling), got {resolution!r}")
        spec["unet"]["sample_size"] = resolution // factor
        spec["vae"]["sample_size"] = resolution
    return spec


def _scale(spec: dict[str, Any], divisor: int) -> list[str]:
    w = _Widths(divisor)
    _scale_unet(spec["unet"], w)
    _scale_vae(spec["vae"], w)
    for name in ("text_encoder", "text_encoder_2"):
        if name in spec:
            _scale_text(spec[name], w, name)
    if "safety_checker" in spec:
        checker = spec["safety_checker"]
        checker["projection_dim"] = w.div("safety_checker.projection_dim", checker["projection_dim"])
        _scale_text(checker["vision_config"], w, "safety_checker.vision_config")
        _scale_text(checker["text_config"], w, "safety_checker.text_config")
    return w.problems


def fitting_divisors(arch: str, up_to: int = 64) -> list[int]:
    """Width divisors from 1 to `up_to` that keep every width of `arch` whole and split into its heads."""
    return [d for d in range(1, up_to + 1) if not _scale(architecture(arch), d)]


# ------------------------------------------------------------------------------------------------ tokenizers
def clip_vocabulary(texts: Sequence[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary laid out as CLIP's: the 512 byte-level symbols, the merges learned from `texts`,
    unused entries up to `vocab_size`, then <|startoftext|> and <|endoftext|> as the last two ids (49406 and
    49407 in CLIP's). The text encoders' configs keep eos_token_id=2, for which transformers takes the pooled
    token at the highest id of each row: that is <|endoftext|> here, as in the real vocabulary."""
    from ..tiny import train_bpe

    learned, merges = train_bpe(texts)
    ordered = [t for t, _ in sorted(learned.items(), key=lambda kv: kv[1]) if t not in _SPECIAL]
    free = vocab_size - len(_SPECIAL) - len(ordered)
    if free < 0:
        raise ValueError(f"{len(ordered)} learned tokens do not fit a vocabulary of {vocab_size}")
    ordered += [f"<|unused{i}|>" for i in range(free)] + list(_SPECIAL)
    return {t: i for i, t in enumerate(ordered)}, merges


def write_clip_tokenizer(folder: Path, spec: dict[str, Any], texts: Sequence[str] = TOKENIZER_WORDS) -> Any:
    """Write a tokenizer folder in the hub's layout (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) and return it as loaded back."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary(texts, int(spec["vocab_size"]))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name in ("tokenizer_config", "special_tokens_map"):
        (folder / f"{name}.json").write_text(json.dumps(spec[name], indent=2) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    if len(tokenizer) != int(spec["vocab_size"]):
        raise RuntimeError(f"{folder}: the tokenizer loads with {len(tokenizer)} tokens, expected {spec['vocab_size']}")
    return tokenizer


# ------------------------------------------------------------------------------------------------ writing
def build_component(name: str, spec: dict[str, Any]) -> Any:
    """Component `name` (unet, vae, text_encoder, text_encoder_2, safety_checker) of a `configs` result,
    randomly initialised by its library (under `torch.device("meta")`: shapes and names without memory)."""
    cfg = spec[name]
    if name == "safety_checker":
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPConfig

        return StableDiffusionSafetyChecker(CLIPConfig.from_dict(cfg))
    library, class_name = spec["model_index"][name]
    cls = getattr(importlib.import_module(library), class_name)
    if library == "transformers":
        from transformers import CLIPTextConfig

        config = CLIPTextConfig.from_dict(cfg)
        return cls(config)
    return cls.from_config(cfg)


def write_fixture(path: str | Path, arch: str, *, width_divisor: int = 1, resolution: int | None = None,
                  seed: int = 0, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write a random-initialised `arch` model directory (see the module doc). Components are built, saved and
    released one at a time, so the peak memory is about the largest component's (the SDXL UNet: 10.3 GB in
    float32 at width divisor 1)."""
    import torch

    from ..model import quiet_hub_logging
    from ..utils.files import atomic_directory

    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    spec = configs(arch, width_divisor, resolution)
    with atomic_directory(path, overwrite=overwrite) as tmp, quiet_hub_logging(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in _WEIGHTED:
            if name not in spec:
                continue
            module = build_component(name, spec).to(getattr(torch, dtype)).eval()
            # one file per component, as the hub's snapshots have it (diffusers would shard the SDXL UNet at 10 GB)
            module.save_pretrained(tmp / name, safe_serialization=True, max_shard_size="1000GB")
            del module
        library, class_name = spec["model_index"]["scheduler"]
        getattr(importlib.import_module(library), class_name).from_config(spec["scheduler"]).save_pretrained(tmp / "scheduler")
        for name in _TOKENIZERS:
            if name in spec:
                write_clip_tokenizer(tmp / name, spec[name])
        if "feature_extractor" in spec:
            (tmp / "feature_extractor").mkdir()
            (tmp / "feature_extractor" / "preprocessor_config.json").write_text(
                json.dumps(spec["feature_extractor"], indent=2) + "\n")
        (tmp / "model_index.json").write_text(json.dumps(spec["model_index"], indent=2) + "\n")
        (tmp / "README.md").write_text(_card(arch, spec, width_divisor, resolution, seed, dtype))
    return Path(path)


def _card(arch: str, spec: dict[str, Any], divisor: int, resolution: int | None, seed: int, dtype: str) -> str:
    size = "exact size" if divisor == 1 else f"every width divided by {divisor}"
    lines = [f"# {spec['name']}: random-initialised fixture", "",
             f"The component configurations of `{spec['hub_repository']}` ({size}; "
             f"{'its own resolution' if resolution is None else f'{resolution} px'}), random weights (seed {seed}, "
             f"{dtype}), written by `freezeasguard make-fixture --arch {arch}`. Not a trained model: its outputs are "
             "noise. The tokenizers' merges are learned offline from a few words; their vocabulary size and "
             "special-token ids are CLIP's.", "", "Where each configuration was read:", ""]
    lines += [f"- `{name}`: {source}" for name, source in spec["sources"].items()]
    return "\n".join(lines) + "\n"
