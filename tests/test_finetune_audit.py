"""Guarded fine-tuning (full and LoRA) keeps frozen tensors bit-identical; verify catches what breaks a guard."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from freezeasguard.audit import AuditError, verify
from freezeasguard.cli import app
from freezeasguard.finetuning import FinetuneConfig, GuardViolation, finetune
from freezeasguard.guard import Guard
from freezeasguard.model import DiffusionModel
from freezeasguard.tiny import TinySpec, build_tiny_model
from freezeasguard.training import TrainConfig

runner = CliRunner()


def _cfg(method="full", **kw):
    return FinetuneConfig(method=method, train=TrainConfig(max_steps=3, batch_size=4, learning_rate=5e-3, progress=False),
                          **kw)


def _frozen_values(model, guard):
    params = dict(model.unet.named_parameters())
    return {n: params[n].detach().clone() for n in guard.frozen}


@pytest.fixture
def base_and_guard(tmp_path):
    model = build_tiny_model(TinySpec(), seed=0)
    base = model.save_pretrained(tmp_path / "base")
    # freeze every to_q / to_k projection (so LoRA's default targets hit frozen modules) plus random others
    names = [n for n, _ in model.unet.named_parameters()]
    chosen = {n for n in names if ".to_q." in n or ".to_k." in n}
    chosen |= set(Guard.random(model.unet, 0.2, seed=0).frozen)
    guard = Guard.from_names(model.unet, chosen, method="test")
    guard.save(tmp_path / "guard.json")
    return base, guard


def test_full_finetune_keeps_frozen_tensors_and_moves_the_rest(base_and_guard, toy_data, tmp_path):
    base, guard = base_and_guard
    model = DiffusionModel.from_pretrained(base)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    result = finetune(model, toy_data(8), guard=guard, config=_cfg(), output_dir=tmp_path / "ft")
    after = dict(model.unet.named_parameters())
    for name in before:
        same = torch.equal(before[name], after[name].detach())
        assert same == (name in guard.frozen), name
    assert result.audit is not None and result.audit.compliant
    assert result.trainable_tensors == len(before) - len(guard.frozen)
    assert verify(tmp_path / "ft" / "model", guard).compliant
    record = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    # shares counted independently: the UNet's unfrozen tensors train, the text encoder does not
    frozen_params = sum(before[n].numel() for n in guard.frozen)
    unet_params = sum(t.numel() for t in before.values())
    assert record["unet"] == pytest.approx({
        "tensors": len(before), "parameters": unet_params, "trainable_tensors": len(before) - len(guard.frozen),
        "trainable_parameters": unet_params - frozen_params, "tensor_share": 1 - len(guard.frozen) / len(before),
        "parameter_share": 1 - frozen_params / unet_params})
    te = list(model.text_encoder.parameters())
    assert record["text_encoder"] == {"tensors": len(te), "parameters": sum(p.numel() for p in te), "trainable_tensors": 0,
                                      "trainable_parameters": 0, "tensor_share": 0.0, "parameter_share": 0.0}
    from conftest import check_train_metrics

    check_train_metrics(record["metrics"], steps=3, global_batch=4, trainable_tensors=result.trainable_tensors,
                        trainable_parameters=unet_params - frozen_params)
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text()) == record["metrics"]


def test_lora_never_lands_on_a_frozen_module(base_and_guard, toy_data, tmp_path):
    base, guard = base_and_guard
    model = DiffusionModel.from_pretrained(base)
    frozen = _frozen_values(model, guard)
    result = finetune(model, toy_data(8), guard=guard, config=_cfg("lora"), output_dir=tmp_path / "ft")
    owners = {n.rpartition(".")[0] for n in guard.frozen}
    assert result.skipped_modules and all(m in owners for m in result.skipped_modules)
    assert result.lora_modules and not (set(result.lora_modules) & owners)
    adapted = {n.split(".lora_")[0] for n, _ in model.unet.named_parameters() if ".lora_" in n}
    assert adapted == set(result.lora_modules)
    params = {n.replace(".base_layer.", "."): p for n, p in model.unet.named_parameters()}
    assert all(torch.equal(frozen[n], params[n].detach()) for n in guard.frozen)
    lora_file = tmp_path / "ft" / "lora" / "pytorch_lora_weights.safetensors"
    assert verify(lora_file, guard).compliant
    # the adapter trained (lora_B starts at zero under gaussian init? no: it starts at zero for LoRA, so it moved)
    assert any(v.abs().max() > 0 for k, v in load_file(str(lora_file)).items() if "lora.up" in k)


def test_explicit_lora_targets_on_frozen_modules_are_an_error_unless_skipped(base_and_guard, toy_data):
    base, guard = base_and_guard
    model = DiffusionModel.from_pretrained(base)
    with pytest.raises(GuardViolation, match="own tensors the guard freezes"):
        finetune(model, toy_data(4), guard=guard, config=_cfg("lora", lora_targets=("to_q", "to_v")))
    model = DiffusionModel.from_pretrained(base)
    result = finetune(model, toy_data(4), guard=guard,
                      config=_cfg("lora", lora_targets=("to_q", "to_v"), skip_frozen_targets=True))
    assert all(m.endswith("to_v") for m in result.lora_modules)


def test_guard_from_another_model_is_refused(base_and_guard, toy_data):
    _, guard = base_and_guard
    other = build_tiny_model(TinySpec(), seed=9)
    with pytest.raises(Exception, match="frozen tensors differ"):
        finetune(other, toy_data(4), guard=guard, config=_cfg())


def test_verify_catches_one_changed_element(base_and_guard, tmp_path):
    base, guard = base_and_guard
    weights = load_file(str(next((base / "unet").glob("*.safetensors"))))
    assert verify(base, guard).compliant
    victim = guard.frozen[len(guard.frozen) // 2]
    tampered = dict(weights)
    t = tampered[victim].clone()
    t.view(-1)[0] += 1e-6 if t.view(-1)[0] != 0 else 1e-3
    tampered[victim] = t
    save_file(tampered, str(tmp_path / "tampered.safetensors"))
    report = verify(tmp_path / "tampered.safetensors", guard)
    assert not report.compliant
    assert [f.name for f in report.violations] == [victim]
    # a change to an unfrozen tensor is allowed
    free = next(n for n in weights if n not in guard.frozen)
    allowed = dict(weights)
    allowed[free] = allowed[free] + 1
    save_file(allowed, str(tmp_path / "allowed.safetensors"))
    assert verify(tmp_path / "allowed.safetensors", guard).compliant


def test_verify_catches_an_adapter_on_a_frozen_module(base_and_guard, tmp_path):
    _, guard = base_and_guard
    module = next(n for n in guard.frozen if ".to_q." in n).rpartition(".")[0]
    free = next(n for n in guard.names if ".to_v." in n and n not in guard.frozen).rpartition(".")[0]
    peft_style = {f"unet.{module}.lora_A.weight": torch.zeros(4, 32), f"unet.{module}.lora_B.weight": torch.zeros(32, 4)}
    save_file(peft_style, str(tmp_path / "bad.safetensors"))
    report = verify(tmp_path / "bad.safetensors", guard)
    assert report.kind == "lora" and not report.compliant
    assert report.violations[0].name == module and report.violations[0].status == "adapter_on_frozen"
    kohya = {f"lora_unet_{m.replace('.', '_')}.lora_down.weight": torch.zeros(4, 32) for m in (module, free)}
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    report = verify(tmp_path / "kohya.safetensors", guard)
    assert [f.name for f in report.violations] == [module]
    save_file({f"unet.{free}.lora_A.weight": torch.zeros(4, 32)}, str(tmp_path / "good.safetensors"))
    assert verify(tmp_path / "good.safetensors", guard).compliant


def test_lower_precision_derivative_is_reported_not_silently_passed(base_and_guard, tmp_path):
    base, guard = base_and_guard
    weights = load_file(str(next((base / "unet").glob("*.safetensors"))))
    half = {k: v.half() for k, v in weights.items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    report = verify(tmp_path / "half.safetensors", guard)
    assert report.compliant
    assert {f.status for f in report.findings} == {"ok_lower_precision"}
    # fp16 with one frozen value nudged by more than rounding: changed, unless a tolerance accepts it
    victim = guard.frozen[0]
    nudged = dict(half)
    nudged[victim] = (half[victim].float() * 1.01).half()
    save_file(nudged, str(tmp_path / "nudged.safetensors"))
    report = verify(tmp_path / "nudged.safetensors", guard)
    assert [f.name for f in report.violations] == [victim] and "float16" in report.violations[0].detail
    assert verify(tmp_path / "nudged.safetensors", guard, base=base, tolerance=0.05).compliant
    assert not verify(tmp_path / "nudged.safetensors", guard, base=base, tolerance=1e-6).compliant


def test_verify_refuses_pickles_and_names_the_file(tmp_path, base_and_guard):
    _, guard = base_and_guard
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    with pytest.raises(AuditError, match="never loaded"):
        verify(tmp_path / "model.ckpt", guard)
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(AuditError, match="junk.safetensors"):
        verify(tmp_path / "junk.safetensors", guard)


def test_cli_verify_exit_codes(base_and_guard, tmp_path):
    base, guard = base_and_guard
    ok = runner.invoke(app, ["verify", str(base), "--guard", str(tmp_path / "guard.json"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["compliant"] is True
    import hashlib

    digest = hashlib.sha256((tmp_path / "guard.json").read_bytes()).hexdigest()
    assert json.loads(ok.output)["guard_sha256"] == digest  # the user compares it with the publisher's
    weights = load_file(str(next((base / "unet").glob("*.safetensors"))))
    weights[guard.frozen[0]] = weights[guard.frozen[0]] + 1
    save_file(weights, str(tmp_path / "bad.safetensors"))
    bad = runner.invoke(app, ["verify", str(tmp_path / "bad.safetensors"), "--guard", str(tmp_path / "guard.json")])
    assert bad.exit_code == 1
    assert guard.frozen[0] in bad.output and f"guard sha256: {digest}" in bad.output


def test_cli_finetune_lora_then_verify_and_inspect(base_and_guard, tmp_path):
    from PIL import Image

    from conftest import CAPTIONS, toy_images
    from freezeasguard.data import write_imagefolder

    base, guard = base_and_guard
    data = write_imagefolder(tmp_path / "data", toy_images(6, 16), [CAPTIONS[i % 4] for i in range(6)])
    args = ["finetune", str(data), "--model", str(base), "--out", str(tmp_path / "ft"), "--guard", str(tmp_path / "guard.json"),
            "--method", "lora", "--steps", "2", "--batch-size", "2", "--lr", "1e-3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "LoRA skipped" in result.output and "compliant" in result.output
    assert "trained, UNet: LoRA adapters on" in result.output and "trained, text encoder: 0/" in result.output
    lora = tmp_path / "ft" / "lora"
    assert runner.invoke(app, ["verify", str(lora), "--guard", str(tmp_path / "guard.json")]).exit_code == 0
    shown = runner.invoke(app, ["inspect", str(tmp_path / "guard.json"), "--png", str(tmp_path / "blocks.png")])
    assert shown.exit_code == 0, shown.output
    assert "down_blocks.0" in shown.output
    assert Image.open(tmp_path / "blocks.png").size[0] > 100
    # explicit targets on frozen modules: a clear error, exit 2, nothing written
    bad = runner.invoke(app, args[:5] + [str(tmp_path / "ft2")] + args[6:] + ["--lora-target", "to_q"])
    assert bad.exit_code == 2 and "own tensors the guard freezes" in bad.output
    assert not (tmp_path / "ft2" / "lora").exists()


def test_text_encoder_stays_frozen_unless_the_guard_allows(base_and_guard, toy_data):
    import dataclasses

    base, guard = base_and_guard
    cfg = dataclasses.replace(_cfg(), train_text_encoder=True)
    with pytest.raises(GuardViolation, match="text encoder frozen"):
        finetune(DiffusionModel.from_pretrained(base), toy_data(4), guard=guard, config=cfg)
    model = DiffusionModel.from_pretrained(base)
    before = {n: p.detach().clone() for n, p in model.text_encoder.named_parameters()}
    finetune(model, toy_data(4), guard=guard, config=_cfg())
    assert all(torch.equal(before[n], p) for n, p in model.text_encoder.named_parameters())
    allowing = dataclasses.replace(guard, allow_text_encoder=True)
    assert Guard.from_dict(allowing.to_dict()).allow_text_encoder
    model = DiffusionModel.from_pretrained(base)
    result = finetune(model, toy_data(4), guard=allowing, config=cfg)
    assert any(not torch.equal(before[n], p) for n, p in model.text_encoder.named_parameters())
    # reported apart: all of the text encoder, the unfrozen share of the UNet
    te = result.text_encoder.to_dict()
    assert te["trainable_tensors"] == len(before) and te["tensor_share"] == te["parameter_share"] == 1.0
    unet = result.unet.to_dict()
    assert unet["trainable_tensors"] == len(guard.names) - len(guard.frozen) and 0 < unet["parameter_share"] < 1
    assert result.trainable_tensors == te["trainable_tensors"] + unet["trainable_tensors"]


def test_seeded_draws_repeat_and_leave_the_callers_stream_alone():
    from freezeasguard.seeding import seeded_global_rng

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with seeded_global_rng(1):
        a = torch.rand(2)
    with seeded_global_rng(1):
        b = torch.rand(2)
    assert torch.equal(a, b)
    assert torch.equal(torch.rand(3), expected)  # as if the seeded block had not run


def _lora_run(toy_data, seed, global_seed):
    torch.manual_seed(global_seed)  # the caller's global RNG state must not decide the adapter's initialisation
    model = build_tiny_model(TinySpec(), seed=0)
    cfg = FinetuneConfig(method="lora", train=TrainConfig(max_steps=1, batch_size=2, learning_rate=1e-3, progress=False,
                                                          seed=seed))
    finetune(model, toy_data(4), config=cfg)
    return {n: p.detach().clone() for n, p in model.unet.named_parameters() if ".lora_" in n}


def test_lora_initialisation_follows_the_run_seed(toy_data):
    a, b, c = _lora_run(toy_data, 3, 100), _lora_run(toy_data, 3, 200), _lora_run(toy_data, 4, 100)
    assert a.keys() == b.keys() == c.keys() and a
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a if "lora_A" in n)


def test_finetune_defaults_are_the_attacker_the_guard_is_evaluated_against():
    """A default `finetune` (API or CLI) is the user fine-tune of the quick benchmark and of the demo."""
    import typer.main

    from freezeasguard.bench.demo import DemoConfig
    from freezeasguard.bench.profiles import PROFILES

    t = FinetuneConfig().train
    default = (t.max_steps, t.batch_size * t.gradient_accumulation, t.learning_rate, t.optimizer)
    quick, demo = PROFILES["quick"], DemoConfig()
    assert default == (quick.steps, quick.batch_size, quick.lr, "adamw")
    assert default[:3] == (demo.steps, demo.batch_size, demo.lr)
    command = typer.main.get_command(app).commands["finetune"]
    cli = {opt: p.default for p in command.params for opt in p.opts}
    assert (cli["--steps"], cli["--batch-size"], cli["--lr"]) == (t.max_steps, t.batch_size, t.learning_rate)


def test_cli_verify_refuses_a_base_that_is_not_the_guards_base(base_and_guard, tmp_path):
    """`verify D --base D --tolerance 0` used to say COMPLIANT for any D: the base is now checked first."""
    base, guard = base_and_guard
    weights = load_file(str(next((base / "unet").glob("*.safetensors"))))
    weights[guard.frozen[0]] = weights[guard.frozen[0]] + 1
    save_file(weights, str(tmp_path / "d.safetensors"))
    d = str(tmp_path / "d.safetensors")
    result = runner.invoke(app, ["verify", d, "--guard", str(tmp_path / "guard.json"), "--base", d, "--tolerance", "0"])
    assert result.exit_code == 2, result.output
    assert guard.frozen[0] in result.output and "not the base" in result.output
    # the real base still serves the elementwise check
    ok = runner.invoke(app, ["verify", d, "--guard", str(tmp_path / "guard.json"), "--base", str(base), "--tolerance", "0"])
    assert ok.exit_code == 1 and guard.frozen[0] in ok.output


def test_half_precision_frozen_tensors_stay_bit_identical_under_mixed_precision(base_and_guard, toy_data, tmp_path):
    """A release stored in bfloat16, fine-tuned under mixed precision: the trainable tensors train in float32
    (optimizer state in float32) and are stored back in bfloat16; the frozen ones never leave bfloat16 and end
    bit for bit as released; the derivative verifies against the float32 guard as lower precision."""
    base, guard = base_and_guard
    model = DiffusionModel.from_pretrained(base).to(dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    cfg = FinetuneConfig(method="full", train=TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-3,
                                                          progress=False, mixed_precision="bf16"))
    result = finetune(model, toy_data(4), guard=guard, config=cfg, output_dir=tmp_path / "ft")
    after = dict(model.unet.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in after.values())
    assert all(torch.equal(after[n], before[n]) for n in guard.frozen)
    assert any(not torch.equal(after[n], before[n]) for n in after if n not in guard.frozen)
    # AdamW's two moments per trainable parameter, in float32
    assert result.train.metrics["optimizer_state_bytes"] >= 8 * result.unet.trainable_parameters
    report = verify(tmp_path / "ft" / "model", guard)
    assert report.compliant and {f.status for f in report.findings if f.name in guard.frozen} == {"ok_lower_precision"}
