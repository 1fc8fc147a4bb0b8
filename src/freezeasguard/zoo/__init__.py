"""The embedded default: a tiny Stable-Diffusion-format model, its recogniser and the emoji scenarios.

`load_base()` and `load_recogniser()` give the demo and the tests the shipped model and recogniser with one
call each (the scenarios are `freezeasguard.bench.emoji.scenario`); the CLI's `--model embedded` loads `load_base()`.
The shipped files live in `freezeasguard/zoo/embedded/` with `manifest.json` recording their SHA-256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelError

EMBEDDED = "embedded"
EMBEDDED_DIR = Path(__file__).with_name("embedded")


def _sha256(path: Path) -> str:
    from ..utils.files import file_sha256

    return file_sha256(path)


def manifest(root: Path = EMBEDDED_DIR) -> dict[str, Any]:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ModelError(f"{path}: the embedded default is not in this installation (no manifest)")
    return json.loads(path.read_text())


def check_files(root: Path = EMBEDDED_DIR) -> list[str]:
    """Shipped files whose SHA-256 differs from the manifest (empty when all is intact)."""
    bad = []
    for rel, digest in manifest(root)["files"].items():
        p = Path(root) / rel
        if not p.is_file() or _sha256(p) != digest:
            bad.append(rel)
    return bad


def base_dir() -> Path:
    manifest()
    return EMBEDDED_DIR / "base"


def load_base(**kwargs: Any):  # type: ignore[no-untyped-def]
    """The shipped base model, in float32 (its weights are stored in float16 to keep the package small)."""
    import torch

    from ..model import DiffusionModel

    kwargs.setdefault("torch_dtype", torch.float32)
    return DiffusionModel.from_pretrained(base_dir(), **kwargs)


def load_recogniser():  # type: ignore[no-untyped-def]
    from ..bench.recogniser import Recogniser

    manifest()
    return Recogniser.load(EMBEDDED_DIR / "recogniser")
