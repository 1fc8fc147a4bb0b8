"""The embedded bases: tiny Stable-Diffusion-format models, their recogniser and the emoji scenarios.

`load_base()` and `load_recogniser()` give the demo and the tests the shipped model and recogniser with one
call each (the scenarios are `freezeasguard.bench.emoji.scenario`); the CLI's `--model embedded` loads `load_base()`.
Each base lives in its own directory of `freezeasguard/zoo/` with `manifest.json` recording the SHA-256 of its
files. `embedded` is the default; `embedded-style` (recipe `zoo.recipe.RECIPES`) is a four times wider UNet
that also knows the OpenMoji style from pre-training, the base of the artstyle scenario's relearn form
(`base_for_scenario`); it shares `embedded`'s VAE, tokenizer and recogniser.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelError

EMBEDDED = "embedded"
EMBEDDED_STYLE = "embedded-style"
BASES = (EMBEDDED, EMBEDDED_STYLE)
EMBEDDED_DIR = Path(__file__).with_name(EMBEDDED)
#: Scenarios (relearn form) whose taught base is not the default. A relearn test of a style needs a base that
#: knows the style from pre-training, and the default's width draws it on the user's concepts at 30-49% at
#: best (docs/results.md, artstyle: capacity).
SCENARIO_BASES: dict[str, str] = {"artstyle": EMBEDDED_STYLE}


def base_root(name: str = EMBEDDED) -> Path:
    """The directory a shipped base (one of `BASES`) lives in."""
    if name not in BASES:
        raise ModelError(f"unknown embedded base {name!r}: use one of {list(BASES)}")
    return EMBEDDED_DIR.with_name(name)


def base_for_scenario(scenario: str, form: str = "relearn") -> str:
    """The base a scenario's relearn form starts from (the from-scratch form always uses the default, which
    never saw the protected concepts)."""
    return SCENARIO_BASES.get(scenario, EMBEDDED) if form == "relearn" else EMBEDDED


def _sha256(path: Path) -> str:
    from ..utils.files import file_sha256

    return file_sha256(path)


def manifest(root: Path = EMBEDDED_DIR) -> dict[str, Any]:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ModelError(f"{path}: this embedded base is not in this installation (no manifest)")
    return json.loads(path.read_text())


def check_files(root: Path = EMBEDDED_DIR) -> list[str]:
    """Shipped files whose SHA-256 differs from the manifest (empty when all is intact)."""
    bad = []
    for rel, digest in manifest(root)["files"].items():
        p = Path(root) / rel
        if not p.is_file() or _sha256(p) != digest:
            bad.append(rel)
    return bad


def base_dir(name: str = EMBEDDED) -> Path:
    root = base_root(name)
    if not (root / "manifest.json").is_file():
        raise ModelError(f"{root}: the embedded base {name!r} is not in this installation; `freezeasguard zoo "
                         f"pretrain --recipe {name} --ship` trains and ships it")
    return root / "base"


def base_identity(name: str = EMBEDDED) -> dict[str, str]:
    """What a model derived from a shipped base records of it: its name and the SHA-256 of its UNet file."""
    base_dir(name)
    return {"name": name, "unet": manifest(base_root(name))["files"]["base/unet/diffusion_pytorch_model.safetensors"]}


def load_base(name: str = EMBEDDED, **kwargs: Any):  # type: ignore[no-untyped-def]
    """A shipped base model, in float32 (its weights are stored in float16 to keep the package small)."""
    import torch

    from ..model import DiffusionModel

    kwargs.setdefault("torch_dtype", torch.float32)
    return DiffusionModel.from_pretrained(base_dir(name), **kwargs)


def load_recogniser(name: str = EMBEDDED):  # type: ignore[no-untyped-def]
    """The recogniser that judges a shipped base's samples (a base that shares another's codec shares its
    recogniser too)."""
    from ..bench.recogniser import Recogniser

    root = base_root(name)
    shared = manifest(root).get("shares_codec_with")
    if shared:
        return load_recogniser(shared)
    return Recogniser.load(root / "recogniser")
