"""The denoising loss as a module, and cached encodings of fixed data.

`DenoisingObjective` is what the training core optimises and what accelerate wraps (DDP needs the forward
to run through the wrapped module). Every random draw of a sample (caption dropout, timestep, noise, latent
sample) comes from that sample's own seed, so a sample gets the same noise whichever process or micro-batch
handles it, and a resumed run redraws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .data import collate_examples
from .model import Conditioning, DiffusionModel
from .seeding import STREAM_NOISE, derive_seed


def target_for(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Regression target of the UNet under the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r} in the scheduler config (epsilon, v_prediction, sample)")


class DenoisingObjective(torch.nn.Module):
    """forward(batch) -> mean denoising loss of the batch.

    A batch holds `seeds` (one int per sample) and either `pixel_values` or cached `latent_mean`/`latent_std`,
    and either `caption` (list of str) or cached `encoder_hidden_states` (with `text_embeds`, the pooled
    embedding, for SDXL); optional `time_ids` give SDXL's size conditioning per sample (else: the batch's image
    size, uncropped); optional `weights` turn the mean into a weighted sum of per-sample losses.
    """

    def __init__(self, model: DiffusionModel, *, caption_dropout: float = 0.0) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        self.unet = model.unet
        self.text_encoder = model.text_encoder
        if model.text_encoder_2 is not None:
            self.text_encoder_2 = model.text_encoder_2
        if model.vae is not None:
            self.vae = model.vae
        else:
            self.vae = None
        # Not a submodule: the DiffusionModel is a plain container around the modules registered above.
        self.__dict__["model"] = model
        self.noise_scheduler = DDPMScheduler.from_config(model.scheduler.config)
        self.caption_dropout = caption_dropout
        self._null: Conditioning | None = None

    def null_conditioning(self) -> Conditioning:
        """Conditioning of the empty caption, one sample without time ids (for caption dropout)."""
        trainable_text = any(p.requires_grad for m in self.model.text_encoders() for p in m.parameters())
        if self._null is None or trainable_text:
            with torch.set_grad_enabled(trainable_text and torch.is_grad_enabled()):
                null = self.model.encode_text([""]).select(0)
            if trainable_text:
                return null
            self._null = null.detach()
        return self._null

    def draws(self, seeds: Sequence[int], shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample (dropped caption, timestep, noise, latent epsilon), in a fixed order per seed."""
        n_steps = int(self.noise_scheduler.config.num_train_timesteps)
        drops, steps, noises, eps = [], [], [], []
        for seed in seeds:
            g = torch.Generator("cpu").manual_seed(derive_seed(int(seed), STREAM_NOISE))
            drops.append(torch.rand((), generator=g) < self.caption_dropout)
            steps.append(torch.randint(0, n_steps, (), generator=g))
            noises.append(torch.randn(tuple(shape), generator=g))
            eps.append(torch.randn(tuple(shape), generator=g))
        return torch.stack(drops), torch.stack(steps), torch.stack(noises), torch.stack(eps)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        device = next(self.unet.parameters()).device
        seeds = batch["seeds"].tolist() if torch.is_tensor(batch["seeds"]) else list(batch["seeds"])
        if "latent_mean" in batch:
            mean = batch["latent_mean"].to(device)
            std = batch.get("latent_std")
            std = std.to(device) if std is not None else None
        else:
            with torch.no_grad():
                mean, std = self.model.encode_images(batch["pixel_values"].to(device))
        drop, timesteps, noise, eps = self.draws(seeds, mean.shape[1:])
        drop, timesteps, noise = drop.to(device), timesteps.to(device), noise.to(device, mean.dtype)
        latents = mean if std is None else mean + std * eps.to(device, mean.dtype)

        if "encoder_hidden_states" in batch:
            pooled = batch.get("text_embeds")
            cond = Conditioning(batch["encoder_hidden_states"].to(device), None if pooled is None else pooled.to(device))
        else:
            cond = self.model.encode_text(batch["caption"])
        if self.caption_dropout > 0 and bool(drop.any()):
            cond = cond.where(drop, self.null_conditioning())
        if "time_ids" in batch:
            cond = Conditioning(cond.hidden, cond.pooled, batch["time_ids"].to(device))
        scale = self.model.vae_scale_factor
        cond = self.model.add_time_ids(cond, latents.shape[-2] * scale, latents.shape[-1] * scale)

        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = target_for(self.noise_scheduler, latents, noise, timesteps)
        pred = self.unet(noisy, timesteps, **cond.unet_kwargs(), return_dict=False)[0]
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        self.last_per_sample = per_sample.detach()
        weights = batch.get("weights")
        if weights is None:
            return per_sample.mean()
        # Signed per-sample weights: guard learning's upper level is (-L_illegal + L_legal) / 2 in one pass.
        return (weights.to(per_sample) * per_sample).sum()


class EncodedDataset:
    """A dataset's latents and caption embeddings computed once, for runs that train only the UNet.

    Random flips are kept: both orientations are encoded and each example picks the one its seed draws,
    exactly as the pixel path would. Random crops cannot be cached and are refused.
    """

    def __init__(self, model: DiffusionModel, dataset: Any, *, batch_size: int = 32, encode_text: bool = True) -> None:
        transform = getattr(dataset, "transform", None)
        if transform is not None and not transform.center_crop:
            raise ValueError("cannot cache latents of a dataset with random crops; use center_crop=True")
        self.dataset = dataset
        self.transform = transform
        self.flips = bool(transform is not None and transform.random_flip)
        n = len(dataset)
        means: list[torch.Tensor] = []
        stds: list[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, n, batch_size):
                pix = torch.stack([dataset[i]["pixel_values"] for i in range(start, min(n, start + batch_size))])
                variants = [pix, torch.flip(pix, dims=[-1])] if self.flips else [pix]
                encoded = [model.encode_images(v.to(model.device)) for v in variants]
                means.append(torch.stack([m.cpu() for m, _ in encoded], dim=1))
                if encoded[0][1] is not None:
                    stds.append(torch.stack([s.cpu() for _, s in encoded], dim=1))
            self.latent_mean = torch.cat(means)  # [N, variants, C, H, W]
            self.latent_std = torch.cat(stds) if stds else None
            captions = list(dataset.captions)
            self.unique_captions = sorted(set(captions))
            position = {c: i for i, c in enumerate(self.unique_captions)}
            self.caption_index = [position[c] for c in captions]
            self.captions = captions
            # With a text encoder that trains, embeddings go stale after one step: keep captions only.
            self.embeddings: torch.Tensor | None = None  # cross-attention states [captions, L, D]
            self.pooled: torch.Tensor | None = None  # SDXL's pooled text embeddings [captions, P]
            if encode_text:
                chunks = [
                    model.encode_text(self.unique_captions[s : s + batch_size]).to("cpu")
                    for s in range(0, len(self.unique_captions), batch_size)
                ]
                self.embeddings = torch.cat([c.hidden for c in chunks])
                if chunks[0].pooled is not None:
                    self.pooled = torch.cat([c.pooled for c in chunks])

    def __len__(self) -> int:
        return len(self.captions)

    def example(self, index: int, seed: int | None) -> dict[str, Any]:
        variant = 1 if (self.flips and seed is not None and self.transform.draw(seed).flip) else 0
        out: dict[str, Any] = {
            "latent_mean": self.latent_mean[index, variant],
            "caption": self.captions[index],
            "index": index,
        }
        if self.embeddings is not None:
            out["encoder_hidden_states"] = self.embeddings[self.caption_index[index]]
        if self.pooled is not None:
            out["text_embeds"] = self.pooled[self.caption_index[index]]
        if self.latent_std is not None:
            out["latent_std"] = self.latent_std[index, variant]
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.example(index, None)

    collate = staticmethod(collate_examples)
