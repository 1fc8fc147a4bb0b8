"""The recipe of the embedded default: a tiny latent Stable-Diffusion-format model and its recogniser.

Stages, each on the one training core, each resumable (checkpoints in the work directory; a finished stage
is skipped on rerun):

1. `vae`: an AutoencoderKL (f = 4: 32 px RGB -> 8x8x4 latents) trained to reconstruct every rendered emoji
   of both styles. Like SD's VAE it is a generic image codec: it carries no captions, and the UNet, not the
   VAE, is what has to learn a concept. Its latent scale is then measured (SD's `scaling_factor`).
2. `unet`: UNet and text encoder trained together from scratch on the shared base set (Twemoji only, no
   illegal or legal concept of either scenario), latents cached, EMA weights kept. A style base
   (`openmoji_in_pretraining`) also sees the OpenMoji style on every base concept outside the artstyle
   reserve, as a real base knows an artist from pre-training.
3. `recogniser`: identity head (people families + legal-far hand gestures) and style head (Twemoji vs
   OpenMoji) trained on real images only; one skin tone is held out of training for the identity test, a
   seeded tenth of the other concepts for the style test.
4. `evaluate`: recognition of the base model's samples (base families, and the illegal / legal concepts it
   never saw) and of a full fine-tune on the user's illegal data of `figures`: the benchmark's validity; for
   a style base also the style it draws on the reserve's concepts, which it never saw in that style.

A recipe that `shares_codec_with` a shipped base takes that base's VAE, tokenizer and recogniser instead of
training its own (stages 1 and 3 copy them), so that two bases are judged by one recogniser and differ only in
what the UNet and text encoder learned. `RECIPES` names the recipe of every shipped base.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..bench import emoji
from ..bench.evaluate import SamplingConfig, sample_and_recognise
from ..bench.recogniser import IGNORE, LabelledImages, Recogniser, RecogniserConfig, RecogniserObjective, accuracy
from ..configs import strict_from_dict
from ..model import DiffusionModel
from ..objective import DenoisingObjective, EncodedDataset
from ..seeding import STREAM_NOISE, derive_seed
from ..tiny import TinySpec, build_tiny_model
from ..training import TrainConfig, train
from ..utils.files import atomic_write_json


@dataclass
class ZooRecipe:
    """Every setting of the embedded default's recipe (defaults: what the shipped weights were made with)."""

    resolution: int = 32
    seed: int = 0
    # architecture: latent f=4, UNet at 8x8 with cross-attention at every level (SD 1.5 has it at 3 of 4)
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_layers_per_block: int = 2
    cross_attention: tuple[bool, ...] = (True, True, True)
    attention_heads: int = 1
    norm_groups: int = 16
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    # a shipped base (zoo.BASES) whose VAE, tokenizer and recogniser are taken instead of trained
    shares_codec_with: str | None = None
    # stage 1: VAE
    vae_steps: int = 1000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # stage 2: UNet + text encoder
    unet_steps: int = 4000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    unet_warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    openmoji_in_pretraining: bool = False  # also the OpenMoji style outside the artstyle reserve
    # stage 3: recogniser
    rec_steps: int = 1500
    rec_batch: int = 128
    rec_lr: float = 2e-3
    heldout_tone: str = "medium"
    # stage 4: evaluation
    eval_per_family: int = 4
    eval_guidance: float = 3.0
    eval_steps: int = 25
    finetune_steps: int = 400
    finetune_batch: int = 32
    finetune_lr: float = 1e-4
    # tests: keep only the first N items of every set (None: all)
    limit_items: int | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZooRecipe:
        return strict_from_dict(cls, data, lambda v: tuple(v) if isinstance(v, list) else v)


def _limit(items: Sequence[Any], recipe: ZooRecipe) -> list[Any]:
    return list(items) if recipe.limit_items is None else list(items)[: recipe.limit_items]


def all_items() -> list[emoji.Item]:
    return [emoji.Item(r, s) for r in emoji.catalogue() for s in emoji.STYLES]


def corpus() -> list[str]:
    """Every caption the benchmark uses: the tokenizer learns a token for each of their words (words never
    seen in pre-training keep their random embeddings, like a name a real model never learned)."""
    return sorted({it.caption for it in all_items()})


def build_untrained(recipe: ZooRecipe) -> DiffusionModel:
    spec = TinySpec(
        resolution=recipe.resolution, latent=True, vae_channels=recipe.vae_channels,
        latent_channels=recipe.latent_channels, block_out_channels=recipe.unet_channels,
        cross_attention=recipe.cross_attention, layers_per_block=recipe.unet_layers_per_block,
        attention_heads=recipe.attention_heads, norm_num_groups=recipe.norm_groups,
        text_hidden_size=recipe.text_hidden, text_layers=recipe.text_layers, text_heads=recipe.text_heads,
        text_intermediate_size=4 * recipe.text_hidden, max_length=32, words=tuple(corpus()),
        beta_schedule="scaled_linear", prediction_type="epsilon",
    )
    return build_tiny_model(spec, seed=recipe.seed)


class VAEObjective(torch.nn.Module):
    """Reconstruction MSE plus a small KL term (SD's VAE recipe without its perceptual and GAN losses)."""

    def __init__(self, vae: Any, kl_weight: float) -> None:
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        device = next(self.vae.parameters()).device
        x = batch["pixel_values"].to(device)
        posterior = self.vae.encode(x).latent_dist
        eps = torch.stack([
            torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(derive_seed(int(s), STREAM_NOISE)))
            for s in batch["seeds"].tolist()
        ]).to(device)
        recon = self.vae.decode(posterior.mean + posterior.std * eps).sample
        return F.mse_loss(recon, x) + self.kl_weight * posterior.kl().mean()


def _train_cfg(recipe: ZooRecipe, **kw: Any) -> TrainConfig:
    return TrainConfig(seed=recipe.seed, progress=recipe.progress, log_every=10, checkpoint_every=250, **kw)


# ---------------------------------------------------------------------------- stages
def stage_vae(model: DiffusionModel, recipe: ZooRecipe, work: Path) -> dict[str, Any]:
    items = _limit(all_items(), recipe)
    data = emoji.dataset(items, recipe.resolution, preload=True)
    vae = model.vae
    result = train(VAEObjective(vae, recipe.vae_kl_weight), data, {f"vae.{n}": p for n, p in vae.named_parameters()},
                   _train_cfg(recipe, max_steps=recipe.vae_steps, batch_size=recipe.vae_batch,
                              learning_rate=recipe.vae_lr, lr_schedule="cosine", lr_warmup_steps=50,
                              weight_decay=0.0),
                   output_dir=work / "run-vae", desc="vae")
    vae.eval()
    with torch.no_grad():
        x = torch.stack([data[i]["pixel_values"] for i in range(0, len(data), max(1, len(data) // 512))])
        posterior = vae.encode(x).latent_dist
        scale = float(1.0 / posterior.mean.std())
        recon = vae.decode(posterior.mean).sample
        mse = float(F.mse_loss(recon, x))
    vae.register_to_config(scaling_factor=scale)
    return {"steps": recipe.vae_steps, "images": len(items), "scaling_factor": scale, "recon_mse": mse,
            "seconds": result.metrics["step_time_s"]["mean_after_warmup"] * len(result.losses) if result.losses else 0,
            "final_loss": result.losses[-1] if result.losses else None}


def share_codec(model: DiffusionModel, recipe: ZooRecipe) -> dict[str, Any]:
    """Stage 1 of a recipe that shares a shipped base's codec: that base's VAE weights and latent scale, once
    its tokenizer is checked to be the one this recipe builds (so both bases read every caption alike)."""
    from . import base_root, load_base, manifest

    name = recipe.shares_codec_with
    assert name is not None
    shipped = load_base(name)
    if shipped.tokenizer.get_vocab() != model.tokenizer.get_vocab():
        raise ValueError(f"zoo base {name!r}: its tokenizer is not the one this recipe builds, so it cannot "
                         "share its codec")
    try:
        model.vae.load_state_dict(shipped.vae.state_dict())
    except RuntimeError as e:
        raise ValueError(f"zoo base {name!r}: its VAE does not fit this recipe's vae_channels / latent_channels "
                         f"({e})") from e
    model.vae.register_to_config(scaling_factor=shipped.vae.config.scaling_factor)
    return {**manifest(base_root(name))["record"]["stages"]["vae"], "shared_with": name}


def unet_items(recipe: ZooRecipe) -> list[emoji.Item]:
    """What the UNet stage pre-trains on: the base set in Twemoji, and for a style base the OpenMoji images
    outside the artstyle reserve."""
    items = _limit(emoji.base_items(recipe.seed), recipe)
    if recipe.openmoji_in_pretraining:
        items += _limit(emoji.style_pretraining_items(), recipe)
    return items


def stage_unet(model: DiffusionModel, recipe: ZooRecipe, work: Path) -> dict[str, Any]:
    items = unet_items(recipe)
    data = emoji.dataset(items, recipe.resolution, preload=True)
    with torch.no_grad():
        cached = EncodedDataset(model, data, encode_text=False)
    objective = DenoisingObjective(model, caption_dropout=recipe.caption_dropout)
    trainable = {f"unet.{n}": p for n, p in model.unet.named_parameters()}
    trainable.update({f"text_encoder.{n}": p for n, p in model.text_encoder.named_parameters()})
    result = train(objective, cached, trainable,
                   _train_cfg(recipe, max_steps=recipe.unet_steps, batch_size=recipe.unet_batch,
                              learning_rate=recipe.unet_lr, lr_schedule="cosine", lr_warmup_steps=recipe.unet_warmup,
                              ema_decay=recipe.ema_decay),
                   output_dir=work / "run-unet", desc="unet+text")
    for m in (model.unet, model.text_encoder):
        m.eval()
        m.requires_grad_(False)
    return {"steps": recipe.unet_steps, "images": len(items), "concepts": len({it.concept for it in items}),
            "openmoji_images": sum(it.style == "openmoji" for it in items),
            "final_loss": result.losses[-1] if result.losses else None,
            "step_time_s": result.metrics["step_time_s"]["mean_after_warmup"],
            # a resumed stage's wall time is its last sitting's only: the card says so, with the thread count
            "resumed_from": result.resumed_from, "threads": torch.get_num_threads()}


def recogniser_items(recipe: ZooRecipe) -> tuple[list[emoji.Item], list[emoji.Item], list[str]]:
    """(train, held-out, identity classes): families and legal-far gestures in both styles; held out = one
    skin tone of every identity, plus a seeded tenth of the other (style-only) concepts."""
    identities = sorted(set(emoji.families()) | set(emoji.LEGAL_FAR_CONCEPTS))
    ident = set(identities)
    train_items: list[emoji.Item] = []
    held: list[emoji.Item] = []
    for it in all_items():
        if it.concept in ident:
            (held if it.record.tone == recipe.heldout_tone else train_items).append(it)
        elif it.record.tone == "none":  # style-only examples: one per concept and style
            bucket = derive_seed(recipe.seed, *it.concept.encode()) % 10
            (held if bucket == 0 else train_items).append(it)
    return _limit(train_items, recipe), _limit(held, recipe), identities


def _labelled(items: Sequence[emoji.Item], identities: list[str], recipe: ZooRecipe) -> LabelledImages:
    index = {c: i for i, c in enumerate(identities)}
    data = emoji.dataset(items, recipe.resolution, preload=True)
    return LabelledImages(data, [index.get(it.concept, IGNORE) for it in items],
                          [emoji.STYLES.index(it.style) for it in items])


def share_recogniser(recipe: ZooRecipe) -> tuple[Recogniser, dict[str, Any]]:
    """Stage 3 of a recipe that shares a shipped base's codec: that base's recogniser and its measured figures."""
    from . import base_root, load_recogniser, manifest

    name = recipe.shares_codec_with
    assert name is not None
    return load_recogniser(name), {**manifest(base_root(name))["record"]["stages"]["recogniser"], "shared_with": name}


def stage_recogniser(recipe: ZooRecipe, work: Path) -> tuple[Recogniser, dict[str, Any]]:
    train_items, held_items, identities = recogniser_items(recipe)
    rec = Recogniser(RecogniserConfig(identities=identities, styles=list(emoji.STYLES), resolution=recipe.resolution))
    train_data = _labelled(train_items, identities, recipe)
    held = _labelled(held_items, identities, recipe)
    train(RecogniserObjective(rec), train_data, {f"recogniser.{n}": p for n, p in rec.named_parameters()},
          _train_cfg(recipe, max_steps=recipe.rec_steps, batch_size=recipe.rec_batch, learning_rate=recipe.rec_lr,
                     lr_schedule="cosine", lr_warmup_steps=50),
          output_dir=work / "run-recogniser", desc="recogniser")
    rec.eval()
    rec.requires_grad_(False)
    metrics = {"heldout": accuracy(rec, held), "train": accuracy(rec, train_data), "steps": recipe.rec_steps,
               "train_images": len(train_items), "heldout_images": len(held_items), "identities": len(identities),
               "heldout_rule": f"identity: tone {recipe.heldout_tone!r} of every identity; style: also a seeded "
                               "tenth of single-variant concepts"}
    return rec, metrics


def _family_prompts(items: Sequence[emoji.Item], per_concept: int) -> tuple[list[str], list[str]]:
    by: dict[str, list[emoji.Item]] = {}
    for it in items:
        by.setdefault(it.concept, []).append(it)
    prompts, targets = [], []
    for concept in sorted(by):
        for it in by[concept][:per_concept]:
            prompts.append(it.caption)
            targets.append(concept)
    return prompts, targets


def style_checks(recipe: ZooRecipe) -> dict[str, list[emoji.Item]]:
    """A style base's checks, each scored as the OpenMoji rate of its samples: prompted in OpenMoji on the
    reserve's concepts, which pre-training never showed in that style (does the base know the style, not
    only the images?); on concepts it saw in OpenMoji; and prompted in Twemoji on the reserve (it must still
    draw the base's own style when asked)."""
    reserve = emoji.artstyle_reserve()
    held = [it for it in _limit(emoji.base_items(recipe.seed), recipe) if it.concept in reserve]
    seen = _limit(emoji.style_pretraining_items(), recipe)
    seen = seen[:: max(1, len(seen) // max(1, len(held)))][: len(held)]
    return {"style_on_reserve": [emoji.Item(it.record, "openmoji") for it in held],
            "style_on_pretrained": list(seen),
            "style_twemoji_on_reserve": held}


def stage_evaluate(model: DiffusionModel, rec: Recogniser, recipe: ZooRecipe, work: Path) -> dict[str, Any]:
    """Validity of the benchmark: the base draws base families, does not draw the held-out ones, and a full
    fine-tune on the user's illegal data of `figures` learns them."""
    from ..finetuning import FinetuneConfig, finetune

    sampling = SamplingConfig(num_inference_steps=recipe.eval_steps, guidance_scale=recipe.eval_guidance)
    fig = emoji.scenario("figures", recipe.seed)
    base_people = [it for it in _limit(emoji.base_items(recipe.seed), recipe) if it.record.family is not None]
    out: dict[str, Any] = {"sampling": asdict(sampling), "seed": recipe.seed}
    prompts, targets = _family_prompts(base_people, recipe.eval_per_family)
    if prompts:  # (a test's truncated base set may hold no people)
        r, _ = sample_and_recognise(model, rec, prompts, targets, seed=recipe.seed, sampling=sampling)
        out["base_families"] = {"rate": r["rate"], "mean_prob": r["mean_prob"], "n": r["n"],
                                "families": len(set(targets))}
    for domain in ("illegal", "legal_near", "legal_far"):
        items = _limit(fig.items(domain, "user"), recipe)
        prompts, targets = [it.caption for it in items], [it.concept for it in items]
        r, _ = sample_and_recognise(model, rec, prompts * 2, targets * 2, seed=recipe.seed + 1, sampling=sampling)
        out[f"base_on_{domain}"] = {"rate": r["rate"], "mean_prob": r["mean_prob"], "n": r["n"]}

    if recipe.openmoji_in_pretraining:
        for key, items in style_checks(recipe).items():
            r, _ = sample_and_recognise(model, rec, [it.caption for it in items], ["openmoji"] * len(items),
                                        head="style", seed=recipe.seed + 3, sampling=sampling)
            out[key] = {"rate": r["rate"], "mean_prob": r["mean_prob"], "n": r["n"]}

    # full fine-tune of a copy of the base on the user's illegal data
    copy = DiffusionModel.from_pretrained(work / "model")
    user = emoji.dataset(_limit(fig.items("illegal", "user"), recipe), recipe.resolution, preload=True)
    t0 = time.perf_counter()
    finetune(copy, user, config=FinetuneConfig(method="full", train=TrainConfig(
        max_steps=recipe.finetune_steps, batch_size=recipe.finetune_batch, learning_rate=recipe.finetune_lr,
        seed=recipe.seed, progress=recipe.progress)), output_dir=work / "run-finetune-check")
    seconds = time.perf_counter() - t0
    items = _limit(fig.items("illegal", "user"), recipe)
    prompts, targets = [it.caption for it in items], [it.concept for it in items]
    r, _ = sample_and_recognise(copy, rec, prompts * 4, targets * 4, seed=recipe.seed + 2, sampling=sampling)
    out["full_finetune_illegal"] = {"rate": r["rate"], "mean_prob": r["mean_prob"], "n": r["n"],
                                    "steps": recipe.finetune_steps, "batch": recipe.finetune_batch,
                                    "lr": recipe.finetune_lr, "seconds": seconds}
    return out


ZOO_PRODUCTS = ("model", "recogniser", "record.json", "run-vae", "run-unet", "run-recogniser", "run-finetune-check")

#: The recipe of every shipped base (`freezeasguard zoo pretrain --recipe NAME`). `embedded-style`: four times
#: the UNet parameters (the artstyle probes found the default too small to draw a style; see docs/results.md),
#: the style in pre-training, the default's codec and recogniser.
RECIPES: dict[str, ZooRecipe] = {
    "embedded": ZooRecipe(),
    "embedded-style": ZooRecipe(unet_channels=(64, 128, 128), openmoji_in_pretraining=True,
                                shares_codec_with="embedded"),
}


def run(work: str | Path, recipe: ZooRecipe | None = None, *, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) every stage into `work`; returns the record written to work/record.json. The run owns
    `work` (io.claim_output_dir): a concurrent run fails at once, a directory of another recipe is refused
    unless `overwrite`."""
    from ..utils.files import claim_output_dir

    recipe = recipe or ZooRecipe()
    identity = {k: v for k, v in json.loads(json.dumps(recipe.to_dict())).items() if k != "progress"}
    with claim_output_dir(work, "zoo pretrain", {"recipe": identity}, ZOO_PRODUCTS, overwrite=overwrite):
        return _run(Path(work), recipe)


def _run(work: Path, recipe: ZooRecipe) -> dict[str, Any]:
    record_path = work / "record.json"
    record: dict[str, Any] = json.loads(record_path.read_text()) if record_path.exists() else {}
    now = json.loads(json.dumps(recipe.to_dict()))  # tuples -> lists, as stored
    saved = record.get("recipe")
    if saved is not None and {k: v for k, v in saved.items() if k != "progress"} != {
            k: v for k, v in now.items() if k != "progress"}:
        raise ValueError(f"{work}: holds a run of another recipe; use a new work directory")
    record["recipe"] = now
    record.setdefault("stages", {})
    record.setdefault("versions", emoji.package_versions())

    def done(stage: str, info: dict[str, Any], seconds: float) -> None:
        record["stages"][stage] = {**info, "wall_seconds": seconds}
        atomic_write_json(record_path, record)

    model_dir = work / "model"
    if "vae" not in record["stages"]:
        t0 = time.perf_counter()
        model = build_untrained(recipe)
        info = share_codec(model, recipe) if recipe.shares_codec_with else stage_vae(model, recipe, work)
        model.save_pretrained(model_dir, overwrite=True)
        done("vae", info, time.perf_counter() - t0)
    if "unet" not in record["stages"]:
        t0 = time.perf_counter()
        model = DiffusionModel.from_pretrained(model_dir)
        info = stage_unet(model, recipe, work)
        model.save_pretrained(model_dir, overwrite=True)
        done("unet", info, time.perf_counter() - t0)
    if "recogniser" not in record["stages"]:
        t0 = time.perf_counter()
        rec, info = share_recogniser(recipe) if recipe.shares_codec_with else stage_recogniser(recipe, work)
        rec.save(work / "recogniser", extra={"metrics": info})
        done("recogniser", info, time.perf_counter() - t0)
    if "evaluate" not in record["stages"]:
        t0 = time.perf_counter()
        model = DiffusionModel.from_pretrained(model_dir)
        info = stage_evaluate(model, Recogniser.load(work / "recogniser"), recipe, work)
        done("evaluate", info, time.perf_counter() - t0)
    return record


__all__ = ["RECIPES", "ZooRecipe", "all_items", "build_untrained", "corpus", "run", "unet_items"]
