"""Full-size architectures: fixtures with the exact configurations of SD 1.5, SD 2.1 and SDXL, and SDXL through
the model layer (two text encoders, pooled-text and time-id conditioning), training, LoRA and saving.

The default runs use a width divisor: the real structure and tensor names at a small width, seconds each. The
exact sizes are built on the meta device (names and parameter counts without memory) or, marked slow, written.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from freezeasguard.cli import app
from freezeasguard.errors import ModelError
from freezeasguard.finetuning import FinetuneConfig, GuardViolation, finetune
from freezeasguard.guard import Guard, GuardError, unet_tensors
from freezeasguard.model import Conditioning, DiffusionModel
from freezeasguard.objective import DenoisingObjective, EncodedDataset
from freezeasguard.training import TrainConfig
from freezeasguard.zoo.fixtures import (
    ARCHITECTURES,
    architecture,
    build_component,
    configs,
    fitting_divisors,
    write_fixture,
)

# The smallest width divisor each architecture's attention heads allow (SD 1.5's 8 heads at 320 channels: 8).
SMALL = {"sd15": 8, "sd21": 16, "sdxl": 16}
SIDE = 64  # image side of the small fixtures: a latent of 8, enough for SD's three downsamplings

# What diffusers and transformers build from the recorded configurations: tensors and parameters at exact size.
# The parameter counts are the published ones (SD 1.5's UNet 859.52 M, SD 2.1's 865.91 M, SDXL's 2.567 B; the
# VAE 83.65 M; CLIP ViT-L/14's text model 123.06 M, OpenCLIP ViT-H/14's 23 layers 340.39 M, ViT-bigG/14's 694.66 M).
REAL = {
    "sd15": {"unet": (686, 859_520_964), "vae": (248, 83_653_863), "text_encoder": (196, 123_060_480)},
    "sd21": {"unet": (686, 865_910_724), "vae": (248, 83_653_863), "text_encoder": (372, 340_387_840)},
    "sdxl": {"unet": (1680, 2_567_463_684), "vae": (248, 83_653_863), "text_encoder": (196, 123_060_480),
             "text_encoder_2": (517, 694_659_840)},
}
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}
# Keys of a saved config that are the library's bookkeeping, not the architecture.
BOOKKEEPING = {"architectures", "torch_dtype", "dtype", "transformers_version", "model_type", "_name_or_path"}

runner = CliRunner()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Each architecture written at its smallest width divisor, images of SIDE px."""
    root = tmp_path_factory.mktemp("fixtures")
    return {arch: write_fixture(root / arch, arch, width_divisor=SMALL[arch], resolution=SIDE, seed=0)
            for arch in ARCHITECTURES}


def _names(path):
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _meta_names(arch, component):
    with torch.device("meta"):
        module = build_component(component, configs(arch))
    params = list(module.parameters())
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}, len(params), sum(p.numel() for p in params)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_exact_size_tensor_counts_are_the_real_ones(arch):
    for component, (tensors, parameters) in REAL[arch].items():
        _, n, p = _meta_names(arch, component)
        assert (n, p) == (tensors, parameters), component


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_small_fixtures_keep_every_tensor_name_and_rank(arch, small):
    """At a width divisor every weight file holds exactly the exact-size model's tensor names, each of the same
    rank, and no dimension grows: only widths shrink."""
    for component in REAL[arch]:
        exact, _, _ = _meta_names(arch, component)
        written = _names(small[arch] / component / WEIGHT_FILES[component])
        assert written.keys() == exact.keys(), component
        assert len(written) == REAL[arch][component][0]
        for name, shape in written.items():
            assert len(shape) == len(exact[name]) and all(a <= b for a, b in zip(shape, exact[name])), name
        # the divisor divides widths: some tensor shrank by exactly it in some dimension
        assert any(a * SMALL[arch] == b for n, s in written.items() for a, b in zip(s, exact[n])), component


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fixtures_hold_the_recorded_configurations(arch, small):
    """What a library reads back from each folder is the recorded configuration, with only the widths (and the
    sample sizes, for the small fixtures) changed; the layout is the hub's."""
    recorded = architecture(arch)
    expected = configs(arch, SMALL[arch], SIDE)
    root = small[arch]
    for component in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        if component not in recorded:
            continue
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        saved = json.loads((root / component / name).read_text())
        for key, value in expected[component].items():
            if key.startswith("_") or key in BOOKKEEPING:
                continue
            assert saved[key] == value, (component, key)
    widths = {("unet", "block_out_channels"), ("unet", "cross_attention_dim"), ("unet", "norm_num_groups"),
              ("unet", "sample_size"), ("unet", "addition_time_embed_dim"), ("unet", "projection_class_embeddings_input_dim"),
              ("vae", "block_out_channels"), ("vae", "norm_num_groups"), ("vae", "sample_size")}
    for component in ("unet", "vae"):
        for key, value in recorded[component].items():
            if (component, key) not in widths:
                assert expected[component][key] == value, (component, key)
    for component in ("text_encoder", "text_encoder_2"):
        if component in recorded:
            for key in ("num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings",
                        "hidden_act", "eos_token_id"):
                assert expected[component][key] == recorded[component][key], (component, key)
    assert json.loads((root / "model_index.json").read_text()) == recorded["model_index"]
    assert configs(arch) == recorded  # divisor 1: the recorded configurations, untouched
    for folder in recorded["model_index"]:
        if not folder.startswith("_") and isinstance(recorded["model_index"][folder], list) \
                and recorded["model_index"][folder][0] is not None:
            assert (root / folder).is_dir(), folder
    assert not [p for p in root.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tokenizers_have_clip_s_size_ids_and_padding(arch, small):
    model = DiffusionModel.from_pretrained(small[arch])
    pads = {"sd15": ["<|endoftext|>"], "sd21": ["!"], "sdxl": ["<|endoftext|>", "!"]}[arch]
    tokenizers = [model.tokenizer] + ([model.tokenizer_2] if model.tokenizer_2 is not None else [])
    for tok, pad in zip(tokenizers, pads, strict=True):
        assert len(tok) == 49408 and tok.model_max_length == 77
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token) == (49406, 49407, pad)
        ids = tok("a red cat", padding="max_length", max_length=77).input_ids
        assert len(ids) == 77 and ids[0] == 49406 and ids[4] == 49407  # every word of the caption is one token
    for encoder in model.text_encoders():
        assert encoder.config.vocab_size == 49408 and encoder.config.max_position_embeddings == 77


def test_a_divisor_that_breaks_the_structure_is_refused_with_the_ones_that_fit(tmp_path):
    assert fitting_divisors("sd15") == [1, 2, 4, 8]
    assert fitting_divisors("sdxl") == [1, 2, 4, 8, 16, 32, 64]
    with pytest.raises(ValueError, match=r"does not split into 8 attention heads.*fit sd15: 1, 2, 4, 8"):
        configs("sd15", 16)
    with pytest.raises(ValueError, match="multiple of 32"):
        configs("sdxl", 16, resolution=100)
    result = runner.invoke(app, ["make-fixture", "--arch", "sd15", "--width-divisor", "16", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "Divisors that fit sd15: 1, 2, 4, 8" in result.output
    assert not (tmp_path / "x").exists()


def test_make_fixture_command_writes_a_loadable_deterministic_model(tmp_path):
    args = ["make-fixture", "--arch", "sd21", "--width-divisor", "16", "--resolution", str(SIDE), "--seed", "3"]
    for out in ("a", "b"):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
    model = DiffusionModel.from_pretrained(tmp_path / "a")
    assert model.prediction_type == "v_prediction" and model.resolution == SIDE and not model.is_sdxl
    for component in ("unet", "vae", "text_encoder"):
        a = (tmp_path / "a" / component / WEIGHT_FILES[component]).read_bytes()
        assert a == (tmp_path / "b" / component / WEIGHT_FILES[component]).read_bytes(), component
    assert "stabilityai/stable-diffusion-2-1" in (tmp_path / "a" / "README.md").read_text()
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "a")]).exit_code == 2  # exists, no --overwrite


# ----------------------------------------------------------------------------------------------- SDXL conditioning
def _unet_out(model, cond, latents, t):
    with torch.no_grad():
        return model.unet(latents, t, **cond.unet_kwargs()).sample


def test_sdxl_conditioning_is_both_encoders_hidden_states_the_pooled_embedding_and_the_time_ids(small):
    model = DiffusionModel.from_pretrained(small["sdxl"])
    cond = model.add_time_ids(model.encode_text(["a red cat", "a dog"]), SIDE, SIDE)
    with torch.no_grad():
        out1 = model.text_encoder(model.tokenize(["a red cat", "a dog"]), output_hidden_states=True)
        ids2 = model.tokenizer_2(["a red cat", "a dog"], padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
        out2 = model.text_encoder_2(ids2, output_hidden_states=True)
    # SDXL reads the penultimate layer of both encoders and the projected pooled output of the second
    torch.testing.assert_close(cond.hidden, torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(cond.pooled, out2.text_embeds)
    assert cond.hidden.shape[-1] == model.unet.config.cross_attention_dim
    assert cond.time_ids.tolist() == [[SIDE, SIDE, 0, 0, SIDE, SIDE]] * 2
    torch.testing.assert_close(model.encode_prompts(["a red cat", "a dog"]), cond.hidden)


def test_sdxl_pooled_embedding_and_time_ids_reach_the_unet(small):
    model = DiffusionModel.from_pretrained(small["sdxl"])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, SIDE // 8, SIDE // 8, generator=g)
    t = torch.tensor([10, 500])
    cond = model.add_time_ids(model.encode_text(["a red cat", "a dog"]), SIDE, SIDE)
    base = _unet_out(model, cond, latents, t)
    pooled = Conditioning(cond.hidden, cond.pooled + torch.randn(cond.pooled.shape, generator=g), cond.time_ids)
    sizes = Conditioning(cond.hidden, cond.pooled, model.time_ids(2, 2 * SIDE, SIDE))
    crop = Conditioning(cond.hidden, cond.pooled, cond.time_ids + torch.tensor([0.0, 0, 16, 16, 0, 0]))
    for changed in (pooled, sizes, crop):
        assert (_unet_out(model, changed, latents, t) - base).abs().max() > 1e-4
    assert torch.equal(_unet_out(model, cond, latents, t), base)
    with pytest.raises(ValueError, match="time ids"):
        Conditioning(cond.hidden, cond.pooled).unet_kwargs()


def test_sdxl_cached_encodings_give_the_same_loss_as_captions(small, toy_data):
    model = DiffusionModel.from_pretrained(small["sdxl"])
    data = toy_data(4, side=SIDE)
    cached = EncodedDataset(model, data, batch_size=2)
    assert cached.pooled is not None and cached.pooled.shape == (len(cached.unique_captions), 80)
    objective = DenoisingObjective(model, caption_dropout=0.5)
    raw = data.collate([dict(data.example(i, s), seeds=s) for i, s in enumerate(range(4))])
    enc = cached.collate([dict(cached.example(i, s), seeds=s) for i, s in enumerate(range(4))])
    with torch.no_grad():
        loss = objective(enc)
        torch.testing.assert_close(objective(raw), loss, rtol=1e-4, atol=1e-5)
        # the pooled embedding is part of what the loss sees: without it the UNet cannot run
        no_pooled = {k: v for k, v in enc.items() if k != "text_embeds"}
        with pytest.raises(ValueError, match="text_embeds"):
            objective(no_pooled)
        # per-sample time ids from the data replace the default (the image's own size, uncropped)
        other = objective({**enc, "time_ids": torch.tensor([[2 * SIDE, SIDE, 8, 0, SIDE, SIDE]] * 4)})
    assert not torch.equal(other, loss)


# ----------------------------------------------------------------------------------------------- guarded fine-tuning
def _cfg(method, **kw):
    return FinetuneConfig(method=method, train=TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-3, progress=False),
                          **kw)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_guarded_finetune_keeps_frozen_tensors_bit_identical(arch, method, small, toy_data, tmp_path):
    model = DiffusionModel.from_pretrained(small[arch])
    guard = Guard.random(model.unet, 0.3, seed=0)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    text_before = {f"{c}.{n}": p.detach().clone() for c, m in model.named_text_encoders() for n, p in m.named_parameters()}
    result = finetune(model, toy_data(4, side=SIDE), guard=guard, config=_cfg(method), output_dir=tmp_path / "ft")
    assert result.audit is not None and result.audit.compliant
    after = unet_tensors(model.unet)  # base tensors by their own names, LoRA-wrapped or not
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in guard.frozen)
    moved = [n for n in before if not torch.equal(before[n], after[n].detach())]
    if method == "full":
        assert moved and not set(moved) & set(guard.frozen)
    else:  # LoRA trains its adapters only, never a module that owns a frozen tensor
        assert not moved and result.lora_modules
        frozen_owners = {n.rpartition(".")[0] for n in guard.frozen}
        assert not set(result.lora_modules) & frozen_owners
    assert all(torch.equal(text_before[f"{c}.{n}"], p) for c, m in model.named_text_encoders()
               for n, p in m.named_parameters())
    if method == "full":  # what was written is the fine-tuned model, both text encoders included
        again = DiffusionModel.from_pretrained(tmp_path / "ft" / "model")
        saved = dict(again.unet.named_parameters())
        assert all(torch.equal(before[n], saved[n]) for n in guard.frozen)
        assert again.is_sdxl == (arch == "sdxl")


def test_a_guard_made_on_one_architecture_refuses_another_and_names_tensors(small):
    sd15 = DiffusionModel.from_pretrained(small["sd15"])
    sdxl = DiffusionModel.from_pretrained(small["sdxl"])
    guard = Guard.random(sd15.unet, 0.3, seed=0)
    with pytest.raises(GuardError, match=r"made for another model: \d+ guard tensor\(s\) missing from the model, "
                                         r"e\.g\. \['down_blocks\.0\.attentions"):
        guard.check_fingerprint(sdxl.unet)
    with pytest.raises(GuardError, match="made for another model"):
        finetune(sdxl, [], guard=guard, config=_cfg("full"))


def test_sdxl_text_encoder_training_covers_both_encoders_and_obeys_the_guard(small, toy_data):
    model = DiffusionModel.from_pretrained(small["sdxl"])
    guard = Guard.random(model.unet, 0.3, seed=0)
    cfg = _cfg("full", train_text_encoder=True)
    with pytest.raises(GuardViolation, match="text encoder"):
        finetune(model, toy_data(4, side=SIDE), guard=guard, config=cfg)
    before = {c: {n: p.detach().clone() for n, p in m.named_parameters()} for c, m in model.named_text_encoders()}
    allowing = dataclasses.replace(guard, allow_text_encoder=True)
    result = finetune(model, toy_data(4, side=SIDE), guard=allowing, config=cfg)
    for component, module in model.named_text_encoders():
        assert any(not torch.equal(before[component][n], p) for n, p in module.named_parameters()), component
    share = result.text_encoder.to_dict()
    assert share["tensors"] == 196 + 517 == share["trainable_tensors"]


def test_sdxl_immunising_moves_key_values_in_the_concatenated_text_space(small, toy_data):
    """Immunise's text subspace lives where SDXL's K/V projections read: both encoders' states, concatenated."""
    from freezeasguard.protections.immunise import ImmuniseConfig, immunise_frozen

    model = DiffusionModel.from_pretrained(small["sdxl"])
    frozen = sorted(n for n in unet_tensors(model.unet) if ".attn2.to_k." in n or ".attn2.to_v." in n)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    cfg = ImmuniseConfig(steps=2, reset_every=2, batch_size=2, lr=1e-2, text_subspace=2)
    info = immunise_frozen(model, frozen, toy_data(4, side=SIDE), toy_data(4, side=SIDE, random_flip=False), cfg,
                           seed=0, progress=False)
    changed = {n for n, p in model.unet.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= set(frozen)
    assert all(model.unet.get_parameter(n).shape[1] == model.unet.config.cross_attention_dim for n in changed)
    assert info["text_subspace"]["rank"] == 2


def test_sdxl_uce_edits_every_key_value_projection(small):
    """UCE's closed form works in the space SDXL's K/V read: 70 transformer blocks, 140 projections edited."""
    from freezeasguard.protections.uce import uce_edit

    model = DiffusionModel.from_pretrained(small["sdxl"])
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    info = uce_edit(model, ["a red cat"], ["a dog"], ["a tree", "a house"])
    changed = {n for n, p in model.unet.named_parameters() if not torch.equal(before[n], p)}
    assert len(info["uce_edited_tensors"]) == 140 and changed == set(info["uce_edited_tensors"])


# ----------------------------------------------------------------------------------------------- loading and saving
def test_sdxl_saves_and_loads_with_every_component(small, tmp_path):
    model = DiffusionModel.from_pretrained(small["sdxl"])
    described = model.describe()
    assert described["components"]["unet"]["tensors"] == 1680
    assert described["components"]["text_encoder_2"]["tensors"] == 517
    assert described["conditioning"] == {"cross_attention_dim": 128, "pooled_dim": 80, "time_ids": 6}
    assert described["tokenizer_2"]["vocab_size"] == 49408
    out = model.save_pretrained(tmp_path / "copy")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    again = DiffusionModel.from_pretrained(out)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(model, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for tok in ("tokenizer", "tokenizer_2"):
        caption = ["a red cat! in the style of a photo"]
        assert getattr(model, tok)(caption).input_ids == getattr(again, tok)(caption).input_ids
    assert list((out / "text_encoder_2").glob("*.safetensors"))


def test_sdxl_sampling_runs_through_the_sdxl_pipeline(small):
    model = DiffusionModel.from_pretrained(small["sdxl"])
    assert type(model.pipeline()).__name__ == "StableDiffusionXLPipeline"
    a = model.sample(["a red cat", "a dog"], seed=1, num_inference_steps=2, guidance_scale=2.0)
    b = model.sample(["a red cat", "a dog"], seed=1, num_inference_steps=2, guidance_scale=2.0, batch_size=1)
    assert a.shape == (2, 3, SIDE, SIDE) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_sdxl_directories_with_pickles_or_missing_parts_are_refused(small, tmp_path):
    src = small["sdxl"]
    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled)
    weights = pickled / "text_encoder_2" / "model.safetensors"
    weights.rename(weights.with_name("pytorch_model.bin"))
    with pytest.raises(ModelError, match=r"text_encoder_2: only pickled weights \(pytorch_model.bin\)"):
        DiffusionModel.from_pretrained(pickled)

    # model_index.json edits, each refused with a message naming what is wrong
    edits = [("lonely", lambda index: index.pop("tokenizer_2"), "names text_encoder_2 but no tokenizer_2"),
             ("foreign", lambda index: index.update(text_encoder_2=["some_package", "Evil"]),
              "component 'text_encoder_2' comes from library 'some_package'"),
             ("wrong_kind", lambda index: index.update(tokenizer_2=["transformers", "CLIPTextModel"]),
              "component 'tokenizer_2' names transformers.CLIPTextModel, which is not")]
    for name, edit, message in edits:
        folder = tmp_path / name
        shutil.copytree(src, folder)
        index = json.loads((folder / "model_index.json").read_text())
        edit(index)
        (folder / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ModelError, match=message):
            DiffusionModel.from_pretrained(folder)


def test_an_sdxl_unet_without_its_second_text_encoder_is_refused(small, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(small["sdxl"], half)
    index = json.loads((half / "model_index.json").read_text())
    del index["text_encoder_2"], index["tokenizer_2"]
    (half / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="addition_embed_type='text_time', which needs a pooled text embedding, but "
                                         "the model has no text_encoder_2"):
        DiffusionModel.from_pretrained(half)


# ----------------------------------------------------------------------------------------------- exact size
@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_exact_size_fixture_loads_with_the_real_counts(arch, tmp_path):
    """The full-size directory (SD 1.5: 5.5 GB written with its safety checker; SDXL: 14 GB, loaded into as much
    memory) loads through the model layer with the real tensor and parameter counts."""
    path = write_fixture(tmp_path / arch, arch)
    model = DiffusionModel.from_pretrained(path)
    described = model.describe()
    for component, (tensors, parameters) in REAL[arch].items():
        assert (described["components"][component]["tensors"], described["components"][component]["parameters"]) \
            == (tensors, parameters), component
    assert model.resolution == {"sd15": 512, "sd21": 768, "sdxl": 1024}[arch]


# kohya's SDXL LoRA keys name modules the original (SGM) way; these are keys as such files hold them, with the
# diffusers module each adapts
KOHYA_SDXL = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "lora_unet_input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "lora_unet_middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
    "lora_unet_output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "lora_unet_output_blocks_5_1_transformer_blocks_0_ff_net_2": "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2",
    "lora_unet_output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
    "lora_unet_label_emb_0_0": "add_embedding.linear_1",
}


def _kohya_file(unet, path, heads, text_keys=()):
    from safetensors.torch import save_file

    weights = dict(unet.named_parameters())
    tensors = {}
    for head, module in heads.items():
        w = weights[f"{module}.weight"]  # down [rank, in, *kernel], up [out, rank, 1, 1...], as kohya writes them
        tensors[f"{head}.lora_down.weight"] = torch.zeros(4, *w.shape[1:])
        tensors[f"{head}.lora_up.weight"] = torch.zeros(w.shape[0], 4, *([1] * (w.dim() - 2)))
        tensors[f"{head}.alpha"] = torch.tensor(4.0)
    for key in text_keys:
        tensors[key] = torch.zeros(4, 8)
    save_file(tensors, str(path))
    return path


def test_sdxl_lora_files_in_kohya_and_peft_key_styles_are_audited(small, tmp_path):
    from freezeasguard.audit import verify

    model = DiffusionModel.from_pretrained(small["sdxl"])
    frozen = sorted(f"{m}.weight" for m in list(KOHYA_SDXL.values())[:4])
    guard = Guard.from_names(model.unet, frozen).with_text_encoders(model)
    on_frozen = _kohya_file(model.unet, tmp_path / "frozen.safetensors", dict(list(KOHYA_SDXL.items())[:4]))
    report = verify(on_frozen, guard)
    assert {f.name for f in report.violations if f.status == "adapter_on_frozen"} == set(list(KOHYA_SDXL.values())[:4])
    free = _kohya_file(model.unet, tmp_path / "free.safetensors", dict(list(KOHYA_SDXL.items())[4:]))
    assert verify(free, guard).compliant, verify(free, guard).describe()
    # a LoRA on either text encoder, in either key style, under a guard that keeps them frozen
    for key in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"):
        te = _kohya_file(model.unet, tmp_path / "te.safetensors", dict(list(KOHYA_SDXL.items())[4:]), [key])
        assert [f.status for f in verify(te, guard).violations] == ["text_encoder_adapter"], key


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_publishers_and_users_commands_run_end_to_end_on_each_architecture(arch, small, tmp_path):
    """learn, immunise, finetune (full and LoRA), verify and inspect through the CLI, a few steps each, on the
    small fixture of each architecture: the guard learned on it, the immunised release and its guard, a user's
    fine-tunes of that release, each verified compliant."""
    from conftest import CAPTIONS, toy_images
    from freezeasguard.data import write_imagefolder

    illegal = write_imagefolder(tmp_path / "illegal", toy_images(4, SIDE), [CAPTIONS[i % 2] for i in range(4)])
    legal = write_imagefolder(tmp_path / "legal", toy_images(4, SIDE), [CAPTIONS[2 + i % 2] for i in range(4)])

    def run(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, (args[0], result.output)
        return result.output

    run("learn", "--model", small[arch], "--illegal", illegal, "--legal", legal, "--out", tmp_path / "learn",
        "--mask-steps", 2, "--mask-every", 1, "--mask-batch", 2, "--batch-size", 2, "--warm-steps", 1,
        "--warm-batch-size", 2)
    run("immunise", "--model", small[arch], "--guard", tmp_path / "learn" / "guard.json", "--illegal", illegal,
        "--legal", legal, "--out", tmp_path / "release", "--immunise-steps", 2)
    release, guard = tmp_path / "release" / "model", tmp_path / "release" / "guard.json"
    for method in ("full", "lora"):
        run("finetune", illegal, "--model", release, "--guard", guard, "--method", method, "--steps", 2,
            "--batch-size", 2, "--out", tmp_path / method)
        target = tmp_path / method / ("model" if method == "full" else "lora")
        assert "COMPLIANT" in run("verify", target, "--guard", guard)
    assert "down_blocks" in run("inspect", guard, "--png", tmp_path / "blocks.png")
    loaded = Guard.load(guard)
    assert set(loaded.text_encoders) == ({"text_encoder", "text_encoder_2"} if arch == "sdxl" else {"text_encoder"})


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_service_job_runs_on_each_architecture(arch, small, tmp_path):
    """The guarded fine-tuning service on each architecture's shape: a LoRA job is trained, audited and
    published."""
    from freezeasguard.service.config import ServiceConfig
    from freezeasguard.service.worker import Worker
    from service_helpers import Api, dataset_members, make_zip

    model = DiffusionModel.from_pretrained(small[arch])
    guard_path = Guard.random(model.unet, 0.3, seed=0).with_text_encoders(model).save(tmp_path / "guard.json")
    cfg = ServiceConfig(model=str(small[arch]), guard=str(guard_path), data_dir=str(tmp_path / "service"),
                        checkpoint_every=2, lease_seconds=30.0, heartbeat_seconds=0.2, poll_seconds=0.1,
                        sample_images=1, sample_steps=2, default_steps=2, default_batch_size=2)
    api = Api(cfg)
    headers = api.key()
    r = api.submit(headers, make_zip(dataset_members(side=SIDE)), method="lora", steps=2, lora_rank=2)
    assert r.status_code == 201, r.text
    assert Worker(cfg).run(exit_when_idle=True) == 1
    job = api.client.get(f"/v1/fine-tunes/{r.json()['id']}", headers=headers).json()
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["audit"]["compliant"] is True
