"""The model layer: loading, saving, SD-1.5-shaped directories, the denoising loss and sampling."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from freezeasguard.errors import ModelError
from freezeasguard.model import DiffusionModel
from freezeasguard.objective import DenoisingObjective, EncodedDataset
from freezeasguard.tiny import TinySpec, build_tiny_model


def _config(obj):
    cfg = obj.config.to_dict() if hasattr(obj.config, "to_dict") else dict(obj.config)
    return {k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version", "_diffusers_version")}


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_latent_dir"])
def test_round_trip_keeps_every_tensor_and_config(fixture, request, tmp_path):
    src = request.getfixturevalue(fixture)
    model = DiffusionModel.from_pretrained(src)
    out = model.save_pretrained(tmp_path / "copy")
    again = DiffusionModel.from_pretrained(out)
    for name in ("unet", "text_encoder", "vae"):
        a, b = getattr(model, name), getattr(again, name)
        if a is None:
            assert b is None
            continue
        sa, sb = _state(a), _state(b)
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert _config(a) == _config(b)
    assert _config(model.scheduler) == _config(again.scheduler)
    assert model.tokenize(["a red cat"]).tolist() == again.tokenize(["a red cat"]).tolist()
    # weights are safetensors, not pickles
    assert list((out / "unet").glob("*.safetensors")) and not list((out / "unet").glob("*.bin"))


def test_loads_sd15_shaped_directory_and_keeps_extra_components(tmp_path):
    """A directory laid out like SD 1.5 (PNDM scheduler, safety checker, feature extractor) loads unchanged,
    and a derivative written from it keeps the components this library does not manage."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tiny = build_tiny_model(TinySpec(latent=True, resolution=32))
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(text_config=small, vision_config={**small, "image_size": 32, "patch_size": 16}, projection_dim=8)
    )
    pipe = StableDiffusionPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        scheduler=PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True),
        safety_checker=checker, feature_extractor=CLIPImageProcessor(), requires_safety_checker=True,
    )
    pipe.save_pretrained(tmp_path / "sd15")
    model = DiffusionModel.from_pretrained(tmp_path / "sd15")
    assert type(model.scheduler).__name__ == "PNDMScheduler"
    assert model.vae is not None and model.resolution == 32
    out = model.save_pretrained(tmp_path / "derivative")
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    a = load_file(next((tmp_path / "sd15" / "safety_checker").glob("*.safetensors")))
    b = load_file(next((out / "safety_checker").glob("*.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reloaded = StableDiffusionPipeline.from_pretrained(out)
    assert reloaded.safety_checker is not None


def test_bad_directories_fail_with_the_file_named(tmp_path, tiny_dir):
    with pytest.raises(ModelError, match="not a directory"):
        DiffusionModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="model_index.json"):
        DiffusionModel.from_pretrained(tmp_path / "empty")

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        DiffusionModel.from_pretrained(broken)

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dir, pickled)
    for f in (pickled / "unet").glob("*.safetensors"):
        f.rename(f.with_name("diffusion_pytorch_model.bin"))
    with pytest.raises(ModelError, match="pickled weights"):
        DiffusionModel.from_pretrained(pickled)

    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_dir, foreign)
    index = json.loads((foreign / "model_index.json").read_text())
    index["unet"] = ["some_package", "Evil"]
    (foreign / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="only diffusers, transformers"):
        DiffusionModel.from_pretrained(foreign)


@pytest.mark.parametrize("component, cls", [("tokenizer", ["transformers", "CLIPTextModel"]),
                                             ("scheduler", ["diffusers", "UNet2DConditionModel"]),
                                             ("text_encoder", ["transformers", "CLIPTokenizer"])])
def test_a_component_of_the_wrong_kind_never_reaches_a_pickle(tiny_dir, tmp_path, monkeypatch, component, cls):
    """A model class named for the tokenizer (or scheduler) would read pickled weights from its folder; the
    loader refuses the entry before any file of that folder is opened."""
    import pickle

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    index = json.loads((bad / "model_index.json").read_text())
    index[component] = cls
    (bad / "model_index.json").write_text(json.dumps(index))
    torch.save({"x": torch.zeros(1)}, bad / component / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("a user file reached the unpickler")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    with pytest.raises(ModelError, match=f"component '{component}' names {cls[0]}.{cls[1]}, which is not"):
        DiffusionModel.from_pretrained(bad)


def test_mismatched_components_are_refused(tmp_path):
    model = build_tiny_model(TinySpec())
    other = build_tiny_model(TinySpec(text_hidden_size=16))
    model.text_encoder = other.text_encoder
    model.save_pretrained(tmp_path / "mixed")
    with pytest.raises(ModelError, match="cross_attention_dim"):
        DiffusionModel.from_pretrained(tmp_path / "mixed")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_matches_the_scheduler_target(prediction_type, toy_data):
    model = build_tiny_model(TinySpec(prediction_type=prediction_type))
    objective = DenoisingObjective(model)
    data = toy_data(4)
    batch = data.collate([dict(data.example(i, 100 + i), seeds=100 + i) for i in range(4)])
    loss = objective(batch)
    assert torch.isfinite(loss)

    # recompute by hand from the same per-sample draws
    _, t, noise, _ = objective.draws(batch["seeds"].tolist(), batch["pixel_values"].shape[1:])
    x0 = batch["pixel_values"]
    ac = objective.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
    target = {"epsilon": noise, "v_prediction": ac.sqrt() * noise - (1 - ac).sqrt() * x0, "sample": x0}[prediction_type]
    with torch.no_grad():
        pred = model.unet(noisy, t, encoder_hidden_states=model.encode_prompts(batch["caption"])).sample
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, target), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("latent", [False, True])
def test_cached_encodings_give_the_same_loss(latent, toy_data):
    side = 32 if latent else 16
    model = build_tiny_model(TinySpec(latent=latent, resolution=side))
    data = toy_data(6, side=side, random_flip=True)
    cached = EncodedDataset(model, data, batch_size=4)
    objective = DenoisingObjective(model, caption_dropout=0.3)
    seeds = list(range(6))
    raw = data.collate([dict(data.example(i, s), seeds=s) for i, s in enumerate(seeds)])
    enc = cached.collate([dict(cached.example(i, s), seeds=s) for i, s in enumerate(seeds)])
    with torch.no_grad():
        torch.testing.assert_close(objective(raw), objective(enc), rtol=1e-4, atol=1e-5)


def test_sampling_shape_and_determinism(tiny_latent_dir):
    model = DiffusionModel.from_pretrained(tiny_latent_dir)
    prompts = ["a red cat", "a green dog", "a blue tree"]
    a = model.sample(prompts, seed=3, num_inference_steps=4, guidance_scale=2.0)
    b = model.sample(prompts, seed=3, num_inference_steps=4, guidance_scale=2.0, batch_size=1)
    c = model.sample(prompts, seed=4, num_inference_steps=4, guidance_scale=2.0)
    assert a.shape == (3, 3, 32, 32)
    assert a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # independent of batch size
    assert (a - c).abs().max() > 1e-3  # but not of the seed


def test_pixel_space_sampling(tiny_dir):
    model = DiffusionModel.from_pretrained(tiny_dir)
    images = model.sample(["a red cat"] * 2, seed=0, num_inference_steps=3, guidance_scale=1.0)
    assert images.shape == (2, 3, 16, 16)
    assert 0 <= images.min() and images.max() <= 1
