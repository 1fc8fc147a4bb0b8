"""The model layer: one object over a Stable-Diffusion-format directory on local disk.

A directory written by diffusers' `save_pretrained` (SD 1.x / 2.x, SDXL, or the project's tiny embedded
models) holds `model_index.json` and one folder per component. We load only what fine-tuning and sampling need
(UNet, optional VAE, text encoder(s), tokenizer(s), scheduler) with the libraries' own `from_pretrained`, refuse
pickled weights, and write derivatives back in the same format, keeping the components we did not touch
(safety checker, feature extractor) as they were.

What the UNet is conditioned on is one `Conditioning`: the text encoders' hidden states for cross-attention
and, for SDXL, the pooled embedding of `text_encoder_2` and the size/crop time ids, which reach the UNet as
`added_cond_kwargs`. Training, caching, immunising and sampling all go through it.

A model without a VAE is a pixel-space model: the UNet denoises RGB images in [-1, 1] directly.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ModelError
from .seeding import derive_seed
from .utils.files import atomic_directory

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

# Components this library loads, and the libraries their classes may come from. Class names are read from
# model_index.json; restricting the module keeps a crafted index from importing arbitrary code.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")
_ALLOWED_LIBRARIES = ("diffusers", "transformers")
_REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
# SDXL's added conditioning: original size, crop top-left and target size, each (height, width).
TIME_IDS = 6
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
SAMPLERS = ("ddim", "ddpm", "euler", "dpm")


@contextlib.contextmanager
def quiet_hub_logging() -> Iterator[None]:
    """Silence the libraries' per-file progress bars and warnings while we load or save a few small files."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled(), dlog.get_verbosity(), tlog.get_verbosity())
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        if saved[0]:
            dlog.enable_progress_bar()
        if saved[1]:
            tlog.enable_progress_bar()
        dlog.set_verbosity(saved[2])
        tlog.set_verbosity(saved[3])


def _component_class(index_path: Path, name: str, entry: Any) -> type:
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
        raise ModelError(f"{index_path}: entry {name!r} should be [library, class name], got {entry!r}")
    library, class_name = entry
    if library not in _ALLOWED_LIBRARIES:
        raise ModelError(
            f"{index_path}: component {name!r} comes from library {library!r}; only "
            f"{', '.join(_ALLOWED_LIBRARIES)} components are loaded"
        )
    module = importlib.import_module(library)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ModelError(f"{index_path}: component {name!r}: {library} has no class {class_name!r}")
    # The class decides which files from_pretrained reads: a model class named for the tokenizer or scheduler
    # would read pickled weights from that folder. Each component must be of its own kind.
    kind = _expected_kind(name)
    if not (isinstance(cls, type) and issubclass(cls, kind)):
        raise ModelError(f"{index_path}: component {name!r} names {library}.{class_name}, which is not a "
                         f"{kind.__module__.split('.')[0]}.{kind.__name__}; refusing to load it")
    return cls


def _expected_kind(name: str) -> type:
    import diffusers
    import transformers

    return {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.ModelMixin,
            "text_encoder": transformers.PreTrainedModel, "tokenizer": transformers.PreTrainedTokenizerBase,
            "text_encoder_2": transformers.PreTrainedModel, "tokenizer_2": transformers.PreTrainedTokenizerBase,
            "scheduler": diffusers.SchedulerMixin}[name]


def _refuse_pickles(folder: Path) -> None:
    weights = [p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES]
    if weights and not any(p.suffix == ".safetensors" for p in weights):
        names = ", ".join(sorted(p.name for p in weights))
        raise ModelError(
            f"{folder}: only pickled weights ({names}); freezeasguard loads safetensors only. Convert them "
            "with the library that wrote them (load, then save_pretrained(..., safe_serialization=True))."
        )


def read_model_index(path: str | Path) -> dict[str, Any]:
    """model_index.json of a model directory, with errors that name the file."""
    root = Path(path)
    index_path = root / "model_index.json"
    if not root.is_dir():
        raise ModelError(f"{root}: not a directory (expected a Stable-Diffusion-format model directory)")
    if not index_path.is_file():
        raise ModelError(f"{index_path}: missing; a Stable-Diffusion-format directory starts with model_index.json")
    from .utils.files import read_json

    index = read_json(index_path, "model index", ModelError)
    if not isinstance(index, dict):
        raise ModelError(f"{index_path}: expected a JSON object")
    missing = [c for c in _REQUIRED if not _present(index, c)]
    if missing:
        raise ModelError(f"{index_path}: missing component(s) {', '.join(missing)}")
    if _present(index, "text_encoder_2") != _present(index, "tokenizer_2"):
        have, lacks = ("text_encoder_2", "tokenizer_2") if _present(index, "text_encoder_2") else ("tokenizer_2", "text_encoder_2")
        raise ModelError(f"{index_path}: names {have} but no {lacks}; an SDXL-format model has both")
    return index


def _present(index: dict[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


@dataclass
class Conditioning:
    """What the UNet is conditioned on, for a batch.

    `hidden` [B, L, D]: the cross-attention states (for SDXL both text encoders' penultimate hidden states,
    concatenated). `pooled` [B, P] and `time_ids` [B, 6]: SDXL's added conditioning (the pooled, projected
    embedding of text_encoder_2; original size, crop top-left and target size); None for SD 1.x / 2.x.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of UNet2DConditionModel.forward."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            if self.time_ids is None:
                raise ValueError("SDXL conditioning without time ids: call DiffusionModel.add_time_ids first")
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def where(self, mask: torch.Tensor, other: Conditioning) -> Conditioning:
        """Per sample, `other` (one sample's conditioning, no batch dimension) where `mask` is true, else this.
        The time ids stay: they describe the image, not the caption."""
        hidden = torch.where(mask[:, None, None], other.hidden.to(self.hidden.dtype), self.hidden)
        pooled = self.pooled
        if pooled is not None and other.pooled is not None:
            pooled = torch.where(mask[:, None], other.pooled.to(pooled.dtype), pooled)
        return Conditioning(hidden, pooled, self.time_ids)

    def select(self, i: int) -> Conditioning:
        """Sample i, without the batch dimension."""
        return Conditioning(self.hidden[i], None if self.pooled is None else self.pooled[i],
                            None if self.time_ids is None else self.time_ids[i])

    def detach(self) -> Conditioning:
        return Conditioning(*(None if t is None else t.detach() for t in (self.hidden, self.pooled, self.time_ids)))

    def to(self, device: str | torch.device | None = None) -> Conditioning:
        return Conditioning(*(None if t is None else t.to(device) for t in (self.hidden, self.pooled, self.time_ids)))


@dataclass
class DiffusionModel:
    """UNet, optional VAE, text encoder(s), tokenizer(s) and scheduler of one text-to-image model.

    `text_encoder_2` and `tokenizer_2` are SDXL's second text encoder (CLIPTextModelWithProjection, whose
    pooled output conditions the UNet too) and its tokenizer; None for SD 1.x / 2.x.
    """

    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    vae: Any | None = None
    source: Path | None = None
    index: dict[str, Any] = field(default_factory=dict)
    text_encoder_2: Any | None = None
    tokenizer_2: Any | None = None

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> DiffusionModel:
        root = Path(path).expanduser()
        index = read_model_index(root)
        index_path = root / "model_index.json"
        parts: dict[str, Any] = {}
        for name in COMPONENTS:
            entry = index.get(name)
            if entry is None or (isinstance(entry, list) and entry[0] is None):
                continue
            folder = root / name
            if not folder.is_dir():
                raise ModelError(f"{folder}: missing folder for component {name!r} named in {index_path}")
            component_cls = _component_class(index_path, name, entry)
            kwargs: dict[str, Any] = {}
            if name in _WEIGHTED:
                _refuse_pickles(folder)
                kwargs["use_safetensors"] = True
                if torch_dtype is not None:
                    kwargs["torch_dtype"] = torch_dtype
            try:
                with quiet_hub_logging():
                    parts[name] = component_cls.from_pretrained(folder, **kwargs)
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
                raise ModelError(f"{folder}: cannot load {entry[1]} ({exc})") from exc
        model = cls(
            unet=parts["unet"],
            text_encoder=parts["text_encoder"],
            tokenizer=parts["tokenizer"],
            scheduler=parts["scheduler"],
            vae=parts.get("vae"),
            source=root,
            index=index,
            text_encoder_2=parts.get("text_encoder_2"),
            tokenizer_2=parts.get("tokenizer_2"),
        )
        model._check_consistent()
        for module in model.modules():
            module.eval()
            module.requires_grad_(False)
        if device is not None:
            model.to(device)
        return model

    def _check_consistent(self) -> None:
        unet_cfg = self.unet.config
        self._check_added_conditioning()  # first: a missing text_encoder_2 is the cause of a width mismatch too
        if self.text_encoder_2 is None:
            hidden = getattr(self.text_encoder.config, "hidden_size", None)
            if hidden is not None and unet_cfg.cross_attention_dim != hidden:
                raise ModelError(
                    f"unet.cross_attention_dim={unet_cfg.cross_attention_dim} but the text encoder's hidden_size is "
                    f"{hidden}: these components do not belong together"
                )
        else:
            widths = [int(m.config.hidden_size) for m in self.text_encoders()]
            if unet_cfg.cross_attention_dim != sum(widths):
                raise ModelError(
                    f"unet.cross_attention_dim={unet_cfg.cross_attention_dim} but the text encoders' hidden sizes "
                    f"sum to {sum(widths)} (text_encoder {widths[0]} + text_encoder_2 {widths[1]}): these components "
                    "do not belong together"
                )
        expected = self.vae.config.latent_channels if self.vae is not None else 3
        if unet_cfg.in_channels != expected:
            what = "the VAE's latent_channels" if self.vae is not None else "RGB (a model without a VAE)"
            raise ModelError(f"unet.in_channels={unet_cfg.in_channels} does not match {what}={expected}")

    def _check_added_conditioning(self) -> None:
        """SDXL's UNet embeds the pooled text embedding and the time ids: both must have the widths it expects."""
        kind = self.unet.config.get("addition_embed_type")
        if kind is None and self.text_encoder_2 is None:
            return
        where = f"{self.source}: " if self.source is not None else ""
        if kind != "text_time":
            what = "a text_encoder_2" if self.text_encoder_2 is not None else "one text encoder"
            raise ModelError(f"{where}unet/config.json has addition_embed_type={kind!r} with {what}: freezeasguard "
                             "loads SD 1.x / 2.x (no added conditioning, one text encoder) and SDXL "
                             "(addition_embed_type 'text_time' with text_encoder_2)")
        if self.text_encoder_2 is None:
            raise ModelError(f"{where}unet/config.json has addition_embed_type='text_time', which needs a pooled text "
                             "embedding, but the model has no text_encoder_2 (SDXL's CLIPTextModelWithProjection)")
        if not hasattr(self.text_encoder_2, "text_projection"):
            raise ModelError(f"{where}text_encoder_2 is a {type(self.text_encoder_2).__name__}; SDXL's UNet needs its "
                             "pooled, projected embedding (CLIPTextModelWithProjection)")
        if self.vae is None:
            raise ModelError(f"{where}an SDXL-format model needs its VAE (model_index.json names none)")
        cfg = self.unet.config
        given = int(cfg.addition_time_embed_dim) * TIME_IDS + int(self.text_encoder_2.config.projection_dim)
        if cfg.projection_class_embeddings_input_dim != given:
            raise ModelError(
                f"{where}unet/config.json has projection_class_embeddings_input_dim="
                f"{cfg.projection_class_embeddings_input_dim}, but {TIME_IDS} time ids x addition_time_embed_dim "
                f"{cfg.addition_time_embed_dim} + text_encoder_2's projection_dim "
                f"{self.text_encoder_2.config.projection_dim} = {given}"
            )

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders, pooled-text and time-id conditioning (checked together at load)."""
        return self.text_encoder_2 is not None

    def save_pretrained(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model atomically: a crash leaves either the old directory or the complete new one.

        Components this class does not manage (safety checker, feature extractor, ...) are copied unchanged
        from the source directory, so a derivative of SD 1.5 keeps them.
        """
        pipe = self.pipeline()
        with atomic_directory(path, overwrite=overwrite) as tmp:
            with quiet_hub_logging():
                pipe.save_pretrained(tmp, safe_serialization=True)
            index = json.loads((tmp / "model_index.json").read_text())
            if self.vae is None:
                index["vae"] = [None, None]
            for key, value in self.index.items():
                carried = isinstance(value, list) and len(value) == 2 and value[0] is not None
                if key in COMPONENTS or key.startswith("_") or not carried or self.source is None:
                    continue
                if (self.source / key).is_dir():
                    shutil.copytree(self.source / key, tmp / key)
                    index[key] = value
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return Path(path)

    # ------------------------------------------------------------------ structure
    def modules(self) -> Iterator[torch.nn.Module]:
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is not None:
                yield module

    def named_text_encoders(self) -> Iterator[tuple[str, torch.nn.Module]]:
        """(component name, module) of every text encoder: one for SD 1.x / 2.x, two for SDXL."""
        for name in TEXT_ENCODERS:
            module = getattr(self, name)
            if module is not None:
                yield name, module

    def text_encoders(self) -> Iterator[torch.nn.Module]:
        for _, module in self.named_text_encoders():
            yield module

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> DiffusionModel:
        for module in self.modules():
            module.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Image side in pixels that the UNet's sample_size corresponds to."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.get("prediction_type", "epsilon"))

    def unet_tensors(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.unet.named_parameters())

    def describe(self) -> dict[str, Any]:
        """Counts and shapes for `freezeasguard info` and reports."""

        def count(module: torch.nn.Module | None) -> dict[str, int] | None:
            if module is None:
                return None
            params = list(module.parameters())
            return {"tensors": len(params), "parameters": sum(p.numel() for p in params)}

        def tokenizer(tok: Any) -> dict[str, Any]:
            return {"class": type(tok).__name__, "vocab_size": len(tok), "max_length": int(tok.model_max_length)}

        unet_dtype = next(self.unet.parameters()).dtype
        described = {
            "path": str(self.source) if self.source else None,
            "space": "latent" if self.vae is not None else "pixel",
            "resolution": self.resolution,
            "prediction_type": self.prediction_type,
            "scheduler": type(self.scheduler).__name__,
            "num_train_timesteps": int(self.scheduler.config.num_train_timesteps),
            "dtype": str(unet_dtype).replace("torch.", ""),
            "tokenizer": tokenizer(self.tokenizer),
            "components": {
                "unet": {"class": type(self.unet).__name__, **count(self.unet)},  # type: ignore[dict-item]
                "vae": None if self.vae is None else {"class": type(self.vae).__name__, **count(self.vae)},  # type: ignore[dict-item]
                "text_encoder": {"class": type(self.text_encoder).__name__, **count(self.text_encoder)},  # type: ignore[dict-item]
            },
        }
        if self.is_sdxl:
            described["tokenizer_2"] = tokenizer(self.tokenizer_2)
            described["components"]["text_encoder_2"] = {"class": type(self.text_encoder_2).__name__,
                                                         **count(self.text_encoder_2)}  # type: ignore[dict-item]
            described["conditioning"] = {"cross_attention_dim": int(self.unet.config.cross_attention_dim),
                                         "pooled_dim": int(self.text_encoder_2.config.projection_dim),
                                         "time_ids": TIME_IDS}
        return described

    # ------------------------------------------------------------------ encoding
    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode_prompts(self, captions: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states [B, L, D] as the UNet's cross-attention sees them (grad follows the encoder)."""
        return self.encode_text(captions).hidden

    def encode_text(self, captions: Sequence[str]) -> Conditioning:
        """The captions' conditioning without time ids (they depend on the image size: `add_time_ids`).

        SDXL's is computed by diffusers' own StableDiffusionXLPipeline.encode_prompt, so training sees what
        sampling does; gradients follow the text encoders."""
        if not self.is_sdxl:
            ids = self.tokenize(captions).to(self.text_encoder.device)
            return Conditioning(self.text_encoder(ids)[0])
        hidden, _, pooled, _ = self.pipeline().encode_prompt(list(captions), do_classifier_free_guidance=False)
        return Conditioning(hidden, pooled)

    def time_ids(self, n: int, height: int, width: int, *, device: str | torch.device | None = None) -> torch.Tensor | None:
        """SDXL's time ids [n, 6] for images of height x width pixels, uncropped and unresized (original size =
        target size, crop (0, 0)), as diffusers' SDXL pipeline conditions a sample of that size; None for a model
        without added conditioning."""
        if not self.is_sdxl:
            return None
        row = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
        return row.expand(n, TIME_IDS)

    def add_time_ids(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        """`cond` with the time ids of height x width images where the model takes them and `cond` has none."""
        if not self.is_sdxl:
            return cond
        if cond.pooled is None:
            raise ValueError("an SDXL-format model is conditioned on text_encoder_2's pooled embedding too, but this "
                             "conditioning has none (a cached batch needs 'text_embeds' beside 'encoder_hidden_states')")
        if cond.time_ids is not None:
            return cond
        return Conditioning(cond.hidden, cond.pooled, self.time_ids(len(cond.hidden), height, width,
                                                                    device=cond.hidden.device))

    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean and std of the scaled latent distribution; (pixels, None) for a pixel-space model.

        Returned separately so cached data can draw a fresh latent sample at every step, as uncached training
        does.
        """
        if self.vae is None:
            return pixel_values, None
        vae = self.vae
        dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
        scale = float(vae.config.scaling_factor)
        shift = vae.config.get("shift_factor", None) or 0.0
        return (dist.mean - shift) * scale, dist.std * scale

    # ------------------------------------------------------------------ sampling
    def pipeline(self, sampler: str | None = None) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
        """A diffusers StableDiffusionPipeline over these components (no safety checker: a research tool), or a
        StableDiffusionXLPipeline for an SDXL-format model (no watermarker)."""
        scheduler = self.scheduler if sampler is None else make_sampler(sampler, self.scheduler.config)
        if self.is_sdxl:
            from diffusers import StableDiffusionXLPipeline

            xl = StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=scheduler,
                force_zeros_for_empty_prompt=bool(self.index.get("force_zeros_for_empty_prompt", True)),
                add_watermarker=False,
            )
            xl.set_progress_bar_config(disable=True)
            return xl
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        *,
        seed: int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        negative_prompt: str | None = None,
        sampler: str = "ddim",
        batch_size: int = 32,
    ) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1], one per prompt.

        Image i depends only on (prompts[i], seed, i): each has its own CPU generator, so results do not change
        with batch size or device.
        """
        if not prompts:
            raise ValueError("sample() needs at least one prompt")
        pipe = self.pipeline(sampler)
        side = int(self.unet.config.sample_size) * pipe.vae_scale_factor
        out: list[torch.Tensor] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            generators = [torch.Generator("cpu").manual_seed(derive_seed(seed, start + i)) for i in range(len(chunk))]
            result = pipe(
                prompt=chunk,
                negative_prompt=[negative_prompt] * len(chunk) if negative_prompt is not None else None,
                height=side,
                width=side,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="latent" if self.vae is None else "pt",
                return_dict=False,
            )[0]
            images = result.float()
            if self.vae is None:
                images = (images / 2 + 0.5).clamp(0, 1)
            out.append(images.cpu())
        return torch.cat(out)


def make_sampler(name: str, config: Any) -> Any:
    """A diffusers scheduler for sampling, configured like the model's own (betas, prediction type)."""
    import diffusers

    classes = {
        "ddim": diffusers.DDIMScheduler,
        "ddpm": diffusers.DDPMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "dpm": diffusers.DPMSolverMultistepScheduler,
    }
    if name not in classes:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(classes)}")
    return classes[name].from_config(config)


def load_model(path: str | Path, **kwargs: Any) -> DiffusionModel:
    """Load a model directory (see DiffusionModel.from_pretrained)."""
    return DiffusionModel.from_pretrained(path, **kwargs)
