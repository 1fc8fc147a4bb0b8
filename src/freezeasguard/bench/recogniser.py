"""The evaluator: a small CNN with an identity head and a style head, trained on real images only.

It plays the part of the paper's face recogniser and style descriptors. Its penultimate features are the
feature space of the Frechet distance (torchmetrics' FID with this network as `feature`). Augmentation at
training time (shifts, scale, colour, blur, noise) is drawn from each sample's seed like everything else the
training core does, so recogniser training is reproducible and resumable too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ModelError
from ..seeding import STREAM_NOISE, derive_seed
from ..utils.files import atomic_directory

IGNORE = -100  # label of an image that has no identity class (it still trains the style head)


@dataclass
class RecogniserConfig:
    identities: list[str]
    styles: list[str] = field(default_factory=lambda: ["twemoji", "openmoji"])
    resolution: int = 32
    channels: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d


class Recogniser(torch.nn.Module):
    """forward(images in [-1, 1]) -> {'identity': logits, 'style': logits, 'features': [B, feature_dim]}."""

    def __init__(self, config: RecogniserConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[torch.nn.Module] = []
        c_in = 3
        for c in config.channels:
            layers += [
                torch.nn.Conv2d(c_in, c, 3, padding=1), torch.nn.GroupNorm(8, c), torch.nn.SiLU(),
                torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.GroupNorm(8, c), torch.nn.SiLU(),
                torch.nn.AvgPool2d(2),
            ]
            c_in = c
        self.body = torch.nn.Sequential(*layers)
        self.project = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(config.feature_dim), torch.nn.SiLU())
        self.identity = torch.nn.Linear(config.feature_dim, len(config.identities))
        self.style = torch.nn.Linear(config.feature_dim, len(config.styles))
        with torch.no_grad():  # materialise the lazy layer so the parameter set is fixed
            self.project(self.body(torch.zeros(1, 3, config.resolution, config.resolution)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.body(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {"identity": self.identity(f), "style": self.style(f), "features": f}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Softmax probabilities and features for images in [0, 1] (what samplers return)."""
        self.eval()
        out: dict[str, list[torch.Tensor]] = {"identity": [], "style": [], "features": []}
        device = next(self.parameters()).device
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device) * 2 - 1
            r = self(x)
            out["identity"].append(r["identity"].softmax(-1).cpu())
            out["style"].append(r["style"].softmax(-1).cpu())
            out["features"].append(r["features"].cpu())
        return {k: torch.cat(v) for k, v in out.items()}

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, *, extra: dict[str, Any] | None = None, overwrite: bool = True) -> Path:
        from safetensors.torch import save_file

        with atomic_directory(path, overwrite=overwrite) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                      str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps({"config": self.config.to_dict(), **(extra or {})}, indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Recogniser:
        from safetensors.torch import load_file

        root = Path(path)
        try:
            meta = json.loads((root / "config.json").read_text())
            cfg = meta["config"]
            config = RecogniserConfig(identities=list(cfg["identities"]), styles=list(cfg["styles"]),
                                      resolution=int(cfg["resolution"]), channels=tuple(cfg["channels"]),
                                      feature_dim=int(cfg["feature_dim"]))
            state = load_file(str(root / "model.safetensors"))
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise ModelError(f"{root}: not a recogniser directory (config.json + model.safetensors): {exc}") from exc
        model = cls(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(f"{root}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.eval()
        return model


# ---------------------------------------------------------------------- training
def augment(images: torch.Tensor, seeds: Sequence[int], strength: float = 1.0) -> torch.Tensor:
    """Per-sample shift, scale, brightness/contrast, blur and noise, drawn from each sample's seed.

    Generated images are blurrier and noisier than the real ones; training on degraded real images keeps
    the recogniser from punishing a generator for sharpness rather than identity.
    """
    out = []
    n, _, h, w = images.shape
    for img, seed in zip(images, seeds):
        g = torch.Generator().manual_seed(derive_seed(int(seed), STREAM_NOISE))
        u = torch.rand(8, generator=g)
        scale = 1.0 + (u[0].item() - 0.5) * 0.2 * strength
        dx, dy = ((u[1:3] - 0.5) * 0.2 * strength).tolist()
        theta = torch.tensor([[scale, 0.0, dx], [0.0, scale, dy]], dtype=img.dtype)
        grid = F.affine_grid(theta[None], [1, 3, h, w], align_corners=False)
        x = F.grid_sample(img[None], grid, padding_mode="border", align_corners=False)[0]
        contrast = 1.0 + (u[3].item() - 0.5) * 0.4 * strength
        bright = (u[4].item() - 0.5) * 0.3 * strength
        x = (x * contrast + bright).clamp(-1, 1)
        if u[5].item() < 0.4 * strength:  # blur: a 3x3 box mixed in
            k = torch.full((3, 1, 3, 3), 1 / 9, dtype=x.dtype)
            blurred = F.conv2d(F.pad(x[None], (1, 1, 1, 1), mode="replicate"), k, groups=3)[0]
            x = torch.lerp(x, blurred, u[6].item())
        noise = torch.randn(x.shape, generator=g) * 0.05 * u[7].item() * strength
        out.append((x + noise).clamp(-1, 1))
    return torch.stack(out)


class RecogniserObjective(torch.nn.Module):
    """forward(batch) -> identity CE (where labelled) + style CE, on augmented images."""

    def __init__(self, recogniser: Recogniser, *, augment_strength: float = 1.0) -> None:
        super().__init__()
        self.recogniser = recogniser
        self.augment_strength = augment_strength

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        device = next(self.recogniser.parameters()).device
        seeds = batch["seeds"].tolist()
        x = augment(batch["pixel_values"], seeds, self.augment_strength).to(device)
        out = self.recogniser(x)
        identity = batch["identity"].to(device)
        loss = F.cross_entropy(out["style"], batch["style"].to(device))
        if bool((identity != IGNORE).any()):
            loss = loss + F.cross_entropy(out["identity"], identity, ignore_index=IGNORE)
        return loss


class LabelledImages:
    """Images with identity/style class indices, in the training core's data protocol."""

    def __init__(self, dataset: Any, identity: Sequence[int], style: Sequence[int]) -> None:
        if not len(dataset) == len(identity) == len(style):
            raise ValueError("dataset and labels differ in length")
        self.dataset, self.identity, self.style = dataset, list(identity), list(style)

    def __len__(self) -> int:
        return len(self.dataset)

    def example(self, index: int, seed: int | None) -> dict[str, Any]:
        ex = self.dataset.example(index, None)
        return {"pixel_values": ex["pixel_values"], "identity": self.identity[index], "style": self.style[index]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.example(index, None)


@torch.no_grad()
def accuracy(recogniser: Recogniser, data: LabelledImages, batch_size: int = 256) -> dict[str, float]:
    """Top-1 identity (over labelled images) and style accuracy on un-augmented images."""
    images = torch.stack([data.dataset[i]["pixel_values"] for i in range(len(data))])
    pred = recogniser.predict((images + 1) / 2, batch_size=batch_size)
    ident = torch.tensor(data.identity)
    style = torch.tensor(data.style)
    mask = ident != IGNORE
    return {
        "identity": float((pred["identity"].argmax(-1)[mask] == ident[mask]).float().mean()) if mask.any() else None,
        "style": float((pred["style"].argmax(-1) == style).float().mean()),
        "n_identity": int(mask.sum()),
        "n": len(data),
    }
