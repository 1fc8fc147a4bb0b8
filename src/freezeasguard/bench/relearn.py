"""The relearn form of a scenario: a base that knows the protected concepts, unlearned by the publisher.

FreezeAsGuard guards a model that *knew* the protected people and was then unlearned with UCE; the user tries
to relearn them from their own images, and freezing is what should make the unlearning irreversible. The
shipped embedded base never saw the scenarios' concepts, so the relearn form derives two models from it, per
scenario and seed, by a fixed recipe:

1. **taught**: the base fine-tuned (UNet and text encoder, as pre-training would) on the illegal domain's
   publisher-side images (`teach_items`) mixed with the base's own pre-training images (`base_share` of every
   batch, so the rest of the model stays healthy). The user's images stay held out: they are never taught.
2. **release**: the taught model unlearned by UCE (closed-form edit of the cross-attention keys and values):
   the illegal captions are mapped to a guide the base knows ("a person" for people, Twemoji for the
   OpenMoji style), while the base's people captions and the publisher's legal captions are preserved.

The release is what the publisher guards and what every user fine-tunes. Both models are written once into a
cache directory (atomic model directories) and reloaded from there; the recipe and the seed are in `info.json`.
Cost on the 2-core CPU: the teaching fine-tune (a few minutes), once per scenario and seed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..data import collate_examples
from ..utils.files import atomic_write_json

RECIPE_VERSION = 2  # bump when what the recipe does changes beyond its config (2: artstyle teaches the style broadly)


@dataclass(frozen=True)
class RelearnConfig:
    teach_steps: int = 600
    teach_batch: int = 32
    teach_lr: float = 1e-4
    base_share: float = 0.75  # share of base pre-training images in each teaching batch
    teach_text_encoder: bool = True  # pre-training taught the words too, as SD's CLIP knows names
    uce_lambda: float = 0.03  # weight of the preserved captions in UCE's closed form (measured: see docs/results.md)
    uce_preserve_base_people: bool = True  # keep the base's people families drawn (a healthy release)
    base_images: int | None = None  # teach on the first N base images only (None: all; small N for tests)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Mixture:
    """Two datasets in fixed proportion: the first `n_a` indices are dataset `a` (cycled), the rest `b`
    (cycled), so a seeded permutation of the indices gives every batch about the proportion asked for."""

    def __init__(self, a: Any, b: Any, share_a: float) -> None:
        if not 0.0 < share_a < 1.0:
            raise ValueError(f"share must be in (0, 1), got {share_a}")
        self.a, self.b = a, b
        self.n_b = max(len(b), 1)
        self.n_a = max(len(a), round(self.n_b * share_a / (1 - share_a)))
        self.n_b = max(self.n_b, round(self.n_a * (1 - share_a) / share_a))

    def __len__(self) -> int:
        return self.n_a + self.n_b

    def example(self, index: int, seed: int | None) -> dict[str, Any]:
        if index < self.n_a:
            return self.a.example(index % len(self.a), seed)
        return self.b.example((index - self.n_a) % len(self.b), seed)

    collate = staticmethod(collate_examples)


def teach_items(sc: Any) -> tuple[Any, ...]:
    """What pre-training taught the base of the illegal domain, on the publisher's side of the split.

    figures: the publisher's images of the protected families (their other skin tones stay with the user).
    artstyle: the OpenMoji style on every base concept except the user's (a base knows an artist from many
    works, not from the few the publisher samples; the user's concepts in that style stay held out). Taught on
    the publisher's 64 concepts alone, the style reached only 32% on the user's concepts (figures seed 0 recipe,
    artstyle seed 0): the base did not know it, and a relearn test needs a base that does.
    """
    from . import emoji

    if sc.name != "artstyle":
        return tuple(sc.items("illegal", "publisher"))
    held_out = {it.concept for it in sc.items("illegal", "user")}
    return tuple(emoji.Item(it.record, "openmoji") for it in sc.items("base") if it.concept not in held_out)


def uce_prompts(sc: Any, *, preserve_base_people: bool = True) -> dict[str, list[str]]:
    """UCE's edit, guide and preserve captions for a scenario: illegal captions toward a guide the base
    knows ('a person' for people, Twemoji for the OpenMoji style); the publisher's legal captions (and the
    base's people captions, for a healthy release) preserved."""
    items = sc.items("illegal", "publisher")
    edit = [it.caption for it in items]
    if sc.name == "artstyle":
        guide = [c.replace("openmoji style", "twemoji style") for c in edit]
    else:
        guide = [c.replace(f"of a {it.concept},", "of a person,").replace(f"of an {it.concept},", "of a person,")
                 for c, it in zip(edit, items)]
    preserve = [it.caption for it in sc.items("legal_near", "publisher") + sc.items("legal_far", "publisher")]
    if preserve_base_people:
        preserve += sorted({it.caption for it in sc.items("base") if it.record.family is not None})
    return {"uce_edit": edit, "uce_guide": guide, "uce_preserve": preserve}


def recipe_of(scenario: str, seed: int, config: RelearnConfig, base: dict[str, str] | None = None) -> dict[str, Any]:
    """What a relearn cache was built from (its info.json's "recipe"): a cache is reused only for this.
    The base and the artstyle split are named only where they are not what every earlier cache was built
    from (the default base; the split before the style reserve), so those caches stay valid."""
    recipe = {"scenario": scenario, "seed": seed, "config": config.to_dict(), "version": RECIPE_VERSION}
    if base is not None and base.get("name") != "embedded":
        recipe["base"] = dict(base)
    from .emoji import split_identity

    recipe.update(split_identity(scenario) or {})
    return recipe


def prepare(sc: Any, base_loader: Any, cache_dir: str | Path, config: RelearnConfig | None = None,
            *, base: dict[str, str] | None = None, progress: bool = True) -> dict[str, Path]:
    """The taught and released models of scenario `sc` (its seed included), built once into `cache_dir`.
    Returns {"taught": dir, "release": dir}. `base` identifies the shipped base `base_loader` loads
    (`zoo.base_identity`). A cache built with another recipe is refused."""
    import torch

    from ..finetuning import FinetuneConfig, finetune
    from ..model import DiffusionModel
    from ..objective import EncodedDataset
    from ..protections.uce import uce_edit
    from ..training import TrainConfig
    from . import emoji

    cfg = config or RelearnConfig()
    out = Path(cache_dir)
    info_path = out / "info.json"
    recipe = recipe_of(sc.name, sc.seed, cfg, base)
    dirs = {"taught": out / "teach" / "model", "release": out / "release"}
    if info_path.exists():
        recorded = json.loads(info_path.read_text()).get("recipe")
        if recorded != recipe:
            raise ValueError(f"{out}: holds relearn models of another recipe ({recorded}); use another work directory")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(info_path, {"recipe": recipe})
    if not (out / "teach" / "finetune.json").exists():
        model = base_loader()
        res = model.resolution
        with torch.no_grad():  # latents once; captions stay text because the text encoder trains
            base_items = sc.items("base")[: cfg.base_images]
            base = EncodedDataset(model, emoji.dataset(base_items, res, preload=True), encode_text=False)
            taught = EncodedDataset(model, emoji.dataset(teach_items(sc), res, preload=True), encode_text=False)
        ft = FinetuneConfig(method="full", train_text_encoder=cfg.teach_text_encoder, cache_encodings=False,
                            train=TrainConfig(max_steps=cfg.teach_steps, batch_size=cfg.teach_batch,
                                              learning_rate=cfg.teach_lr, seed=sc.seed, checkpoint_every=200,
                                              progress=progress))
        finetune(model, Mixture(base, taught, cfg.base_share), config=ft, output_dir=out / "teach")
    if not (dirs["release"] / "model_index.json").exists():
        model = DiffusionModel.from_pretrained(dirs["taught"], torch_dtype=torch.float32)
        prompts = uce_prompts(sc, preserve_base_people=cfg.uce_preserve_base_people)
        info = uce_edit(model, prompts["uce_edit"], prompts["uce_guide"], prompts["uce_preserve"], lam=cfg.uce_lambda)
        model.save_pretrained(dirs["release"], overwrite=True)
        atomic_write_json(info_path, {"recipe": recipe, "uce": info})
    return dirs
