"""freezeasguard: release a diffusion model with a guard of frozen UNet tensors (FreezeAsGuard).

The public API is imported lazily, so `import freezeasguard` (and the CLI's --help) stays fast: torch and
diffusers load on first use of a name that needs them.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"


class _NoTorchvisionFallbackNote(logging.Filter):
    """Drops transformers' note that an image processor falls back to its PIL version without torchvision.

    diffusers' pipelines import CLIP's and SigLIP's image processors, so every run that samples printed the note
    twice; this project never uses those processors (no safety checker, no image encoder) and does not depend
    on torchvision. Only that note is dropped: every other transformers message still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


# The logger exists before transformers is imported (logging.getLogger creates it); transformers reuses it.
logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNote())

_EXPORTS = {
    "DiffusionModel": "model",
    "load_model": "model",
    "TinySpec": "tiny",
    "build_tiny_model": "tiny",
    "write_tiny_model": "tiny",
    "ImageTransform": "data",
    "ImageCaptionFolder": "data",
    "ImageCaptionList": "data",
    "write_imagefolder": "data",
    "DenoisingObjective": "objective",
    "EncodedDataset": "objective",
    "TrainConfig": "training",
    "TrainCallback": "training",
    "TrainResult": "training",
    "train": "training",
    "save_grid": "utils.images",
    "Guard": "guard",
    "GuardError": "guard",
    "FinetuneConfig": "finetuning",
    "finetune": "finetuning",
    "verify": "audit",
    "AuditReport": "audit",
    "LearnConfig": "learn",
    "protect": "protections",
    "PROTECTIONS": "protections",
    "ReleaseContext": "protections",
    "learn_guard": "learn",
    "ImmuniseConfig": "protections.immunise",
    "immunised_release": "protections.immunise",
    "Recogniser": "bench.recogniser",
    "FreezeAsGuardError": "errors",
    "DataError": "errors",
    "ModelError": "errors",
    "CheckpointError": "errors",
    "DivergedError": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'freezeasguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .audit import AuditReport, verify
    from .bench.recogniser import Recogniser
    from .data import ImageCaptionFolder, ImageCaptionList, ImageTransform, write_imagefolder
    from .errors import CheckpointError, DataError, DivergedError, FreezeAsGuardError, ModelError
    from .finetuning import FinetuneConfig, finetune
    from .guard import Guard, GuardError
    from .learn import LearnConfig, learn_guard
    from .model import DiffusionModel, load_model
    from .objective import DenoisingObjective, EncodedDataset
    from .protections import PROTECTIONS, ReleaseContext, protect
    from .protections.immunise import ImmuniseConfig, immunised_release
    from .tiny import TinySpec, build_tiny_model, write_tiny_model
    from .training import TrainCallback, TrainConfig, TrainResult, train
    from .utils.images import save_grid
