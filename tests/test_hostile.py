"""The bad-input catalogue: what a hostile but fair user tries, one row per case.

Each table holds rows of (id, build, expectation). To add a case, add a row: `build` makes the input from the
shared fixtures, and the expectation says what must happen (a verdict naming what is wrong, or an error
naming the input). Ids number the cases in the order
they were first tried.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import without_sketches
from freezeasguard.audit import AuditError, verify
from freezeasguard.finetuning import FinetuneConfig, finetune
from freezeasguard.guard import Guard
from freezeasguard.model import DiffusionModel
from freezeasguard.tiny import TinySpec, build_tiny_model
from freezeasguard.training import TrainConfig
from freezeasguard.utils.files import OutputDirError, atomic_write_json, claim_output_dir


# ---------------------------------------------------------------------------- shared fixtures
@dataclass
class Env:
    base: Path  # a saved model directory (the guard's base)
    guard: Guard
    weights: dict[str, torch.Tensor]  # the base UNet state dict
    victim: str  # a frozen tensor that hostile inputs change
    free_module: str  # a module owning no frozen tensor (adapters may go there)
    frozen_module: str
    tmp: Path = field(default=Path())

    def unet_folder(self, name: str, weights: dict[str, torch.Tensor],
                    extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        folder = self.tmp / name
        folder.mkdir(parents=True)
        shutil.copy(self.base / "unet" / "config.json", folder / "config.json")
        save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
        for file, tensors in (extra or {}).items():
            save_file(tensors, str(folder / file))
        return folder

    def changed(self, fn: Callable[[torch.Tensor], torch.Tensor] = lambda t: t * 2) -> dict[str, torch.Tensor]:
        out = dict(self.weights)
        out[self.victim] = fn(out[self.victim]).contiguous()
        return out

    def file(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        (self.tmp / name).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(self.tmp / name))
        return self.tmp / name

    def raw(self, name: str, content: bytes, folder: Path | None = None) -> Path:
        """Write bytes to `name` (in `folder`, made if needed); return the folder if given, else the file."""
        where = folder if folder is not None else self.tmp
        where.mkdir(parents=True, exist_ok=True)
        (where / name).write_bytes(content)
        return folder if folder is not None else where / name

    def adapter(self, module: str, rank: int = 2, prefix: str = "unet.") -> dict[str, torch.Tensor]:
        out_f, in_f = self.weights[f"{module}.weight"].shape[:2]
        return {f"{prefix}{module}.lora.down.weight": torch.zeros(rank, in_f),
                f"{prefix}{module}.lora.up.weight": torch.zeros(out_f, rank)}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    model = build_tiny_model(TinySpec(), seed=0)
    base = model.save_pretrained(root / "base")
    names = [n for n, _ in model.unet.named_parameters()]
    chosen = {n for n in names if ".to_q." in n} | set(Guard.random(model.unet, 0.2, seed=0).frozen)
    guard = Guard.from_names(model.unet, chosen, method="test").with_text_encoders(model)
    weights = load_file(str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    # a tensor whose values differ (a norm weight of ones is its own permutation)
    victim = next(n for n in guard.frozen if n.endswith(".weight") and weights[n].numel() > 16 and weights[n].std() > 0)
    owners = {n.rpartition(".")[0] for n in guard.frozen}
    free = next(n.rpartition(".")[0] for n in names if ".to_v." in n and n.rpartition(".")[0] not in owners)
    frozen_module = next(n.rpartition(".")[0] for n in guard.frozen if ".to_q." in n)
    return Env(base, guard, weights, victim, free, frozen_module)


@pytest.fixture
def env(shared, tmp_path):
    return Env(**{**shared.__dict__, "tmp": tmp_path})


# ---------------------------------------------------------------------------- verify: the catalogue
@dataclass
class VerifyCase:
    id: str
    build: Callable[[Env], Path]
    # "compliant", "violation" (with `names`: each must be a violation's name or status) or "error" (`names` in
    # the message)
    expect: str
    names: Callable[[Env], list[str]] = lambda e: []
    kwargs: Callable[[Env], dict[str, Any]] = lambda e: {}
    guard: Callable[[Env], Guard] = lambda e: e.guard
    notes: list[str] = field(default_factory=list)  # substrings that must appear in the report's notes


def _model_dir_with_unet_class(e: Env, cls: list[str]) -> Path:
    d = e.tmp / "model"
    shutil.copytree(e.base, d)
    index = json.loads((d / "model_index.json").read_text())
    index["unet"] = cls
    (d / "model_index.json").write_text(json.dumps(index))
    return d


def _model_dir(e: Env, edit: Callable[[Path], None]) -> Path:
    """A copy of the base model directory, edited in place by `edit(folder)`."""
    d = e.tmp / "model"
    shutil.copytree(e.base, d)
    edit(d)
    return d


def _edit_text_encoder(fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                       file: str = "model.safetensors") -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        weights = load_file(str(d / "text_encoder" / "model.safetensors"))
        (d / "text_encoder" / "model.safetensors").unlink()
        save_file(fn(weights), str(d / "text_encoder" / file))
    return edit


def _retrained(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v + 0.01 if v.is_floating_point() else v) for k, v in weights.items()}


def _count_sketch_guard(e: Env) -> Guard:
    """The guard as an older freezeasguard wrote it: count sketches (checksum recomputed)."""
    import copy

    from freezeasguard.guard import COUNT_SKETCH, _checksum, tensor_sketch

    data = copy.deepcopy(e.guard.to_dict())
    data["sketch"] = {"method": COUNT_SKETCH, "k": 16, "seed": 0}
    for name, record in data["tensors"].items():
        record["sketch"] = tensor_sketch(e.weights[name], method=COUNT_SKETCH, k=16, seed=0)
    data.pop("checksum")
    data["checksum"] = _checksum(data)
    return Guard.from_dict(data)


def _shuffled_within_count_sketch_buckets(t: torch.Tensor) -> torch.Tensor:
    """`t` with its values moved between positions that share a count-sketch bucket and sign: a large change
    that leaves the count sketch exactly as it was."""
    import hashlib

    import numpy as np

    flat = t.flatten().clone()
    byte = np.frombuffer(hashlib.shake_256(f"freezeasguard-sketch|0|{flat.numel()}".encode()).digest(flat.numel()),
                         np.uint8)
    key = torch.from_numpy((byte & 15).astype(np.int64) * 2 + (byte >= 128))
    out = flat.clone()
    for value in key.unique():
        where = (key == value).nonzero().flatten()
        out[where] = flat[where.roll(1)]
    return out.reshape(t.shape)


def _sharded(e: Env) -> Path:
    """A clean single file, and a sharded index (which a loader prefers) whose shards hold the modified UNet."""
    folder = e.unet_folder("sharded", e.weights)
    changed = e.changed()
    keys = sorted(changed)
    half = len(keys) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    for file, part in shards.items():
        save_file({k: changed[k] for k in part}, str(folder / file))
    weight_map = {k: file for file, part in shards.items() for k in part}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


VERIFY_CASES = [
    VerifyCase("1-extra-file-with-the-original-values", lambda e: e.unet_folder(
        "unet", e.changed(), {"zzz_original.safetensors": {n: e.weights[n] for n in e.guard.frozen}}),
        "violation", lambda e: [e.victim, "zzz_original.safetensors"]),
    VerifyCase("2-modified-unet-plus-a-clean-adapter", lambda e: e.unet_folder(
        "unet", e.changed(), {"pytorch_lora_weights.safetensors": e.adapter(e.free_module)}),
        "violation", lambda e: [e.victim]),
    VerifyCase("3-negated-frozen-tensor-under-tolerance-without-base", lambda e: e.file(
        "neg.safetensors", e.changed(lambda t: -t)), "violation", lambda e: [e.victim],
        kwargs=lambda e: {"tolerance": 1e-2}),
    VerifyCase("3-permuted-frozen-tensor-under-tolerance-without-base", lambda e: e.file(
        "perm.safetensors", e.changed(lambda t: t.flatten().flip(0).reshape(t.shape))), "violation",
        lambda e: [e.victim], kwargs=lambda e: {"tolerance": 1e-2}),
    VerifyCase("3-bfloat16-rounding-passes-tolerance-without-base", lambda e: e.file(
        "bf16.safetensors", {k: v.bfloat16().float() for k, v in e.weights.items()}), "compliant",
        kwargs=lambda e: {"tolerance": 1e-2}),
    VerifyCase("3-old-guard-without-sketches-falls-back-to-norms-and-says-so", lambda e: e.file(
        "neg.safetensors", e.changed(lambda t: -t)), "compliant", kwargs=lambda e: {"tolerance": 1e-2},
        guard=lambda e: Guard.from_dict(without_sketches(e.guard)), notes=["predates value sketches"]),
    VerifyCase("zero-tolerance-is-exact-where-an-estimate-would-pass", lambda e: e.file(
        "neg0.safetensors", e.changed(lambda t: -t)), "violation", lambda e: [e.victim],
        kwargs=lambda e: {"tolerance": 0.0}, guard=lambda e: Guard.from_dict(without_sketches(e.guard))),
    VerifyCase("zero-tolerance-is-exact-without-base", lambda e: e.file(
        "perm0.safetensors", e.changed(lambda t: t.flatten().flip(0).reshape(t.shape))), "violation",
        lambda e: [e.victim], kwargs=lambda e: {"tolerance": 0.0}),
    VerifyCase("values-moved-within-count-sketch-buckets-fail-the-projection-sketch", lambda e: e.file(
        "shuffled.safetensors", e.changed(_shuffled_within_count_sketch_buckets)), "violation", lambda e: [e.victim],
        kwargs=lambda e: {"tolerance": 1e-2}),
    VerifyCase("an-older-count-sketch-guard-passes-them-and-says-so", lambda e: e.file(
        "shuffled.safetensors", e.changed(_shuffled_within_count_sketch_buckets)), "compliant",
        kwargs=lambda e: {"tolerance": 1e-2}, guard=_count_sketch_guard, notes=["count sketches"]),
    VerifyCase("retrained-text-encoder-under-a-guard-that-keeps-it-frozen", lambda e: _model_dir(
        e, _edit_text_encoder(_retrained)), "violation", lambda e: ["text_encoder/model.safetensors:"]),
    VerifyCase("retrained-text-encoder-saved-as-an-fp16-variant", lambda e: _model_dir(
        e, _edit_text_encoder(lambda w: {k: v.half() for k, v in _retrained(w).items()}, "model.fp16.safetensors")),
        "violation", lambda e: ["text_encoder/model.fp16.safetensors:", "text_encoder/"]),
    VerifyCase("text-encoder-stored-in-fp16-is-the-released-one", lambda e: _model_dir(
        e, _edit_text_encoder(lambda w: {k: (v.half() if v.is_floating_point() else v) for k, v in w.items()})),
        "compliant"),
    VerifyCase("retrained-text-encoder-under-a-guard-that-allows-it", lambda e: _model_dir(
        e, _edit_text_encoder(_retrained)), "compliant", notes=["lets the text encoder train"],
        guard=lambda e: Guard(**{**e.guard.__dict__, "allow_text_encoder": True, "text_encoders": None})),
    VerifyCase("a-guard-without-text-encoder-records-says-what-it-missed", lambda e: _model_dir(
        e, _edit_text_encoder(_retrained)), "compliant", notes=["records no text-encoder values"],
        guard=lambda e: Guard(**{**e.guard.__dict__, "text_encoders": None})),
    VerifyCase("text-encoder-weights-removed", lambda e: _model_dir(
        e, lambda d: (d / "text_encoder" / "model.safetensors").unlink()), "violation", lambda e: ["text_encoder/"]),
    VerifyCase("pickle-in-the-text-encoder-folder", lambda e: _model_dir(
        e, lambda d: (d / "text_encoder" / "pytorch_model.bin").write_bytes(b"never unpickled")), "violation",
        lambda e: ["text_encoder/pytorch_model.bin", "unreadable"]),
    VerifyCase("python-file-in-a-model-directory", lambda e: _model_dir(
        e, lambda d: (d / "scheduler" / "pipeline.py").write_text("import os\n")), "violation",
        lambda e: ["scheduler/pipeline.py", "code_on_load"]),
    VerifyCase("config-pointing-at-remote-code", lambda e: _model_dir(
        e, lambda d: (d / "text_encoder" / "config.json").write_text(json.dumps(
            {**json.loads((d / "text_encoder" / "config.json").read_text()), "auto_map": {"AutoModel": "m.M"}}))),
        "violation", lambda e: ["text_encoder/config.json", "code_on_load"]),
    VerifyCase("component-from-a-library-a-loader-imports", lambda e: _model_dir(
        e, lambda d: (d / "model_index.json").write_text(json.dumps(
            {**json.loads((d / "model_index.json").read_text()), "safety_checker": ["evil_pkg", "Checker"]}))),
        "violation", lambda e: ["model_index.json:safety_checker", "code_on_load"]),
    VerifyCase("a-diffusers-pipeline-folder-named-as-a-library-is-not-custom-code", lambda e: _model_dir(
        e, lambda d: (d / "model_index.json").write_text(json.dumps(
            {**json.loads((d / "model_index.json").read_text()),
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"]}))), "compliant"),
    VerifyCase("non-frozen-tensor-absent-is-noted", lambda e: e.file("partial.safetensors", {
        k: v for k, v in e.weights.items() if k != next(n for n in e.weights if n not in e.guard.frozen)}),
        "compliant", notes=["non-frozen UNet tensor(s) absent"]),
    VerifyCase("non-frozen-tensor-reshaped-is-noted", lambda e: e.file("reshaped.safetensors", {
        k: (v.flatten() if k == next(n for n in e.weights if n not in e.guard.frozen and e.weights[n].dim() > 1)
            else v) for k, v in e.weights.items()}), "compliant", notes=["reshaped"]),
    VerifyCase("shard-named-outside-its-folder", lambda e: e.raw(
        "diffusion_pytorch_model.safetensors.index.json", json.dumps({"weight_map": {"a": "../x.safetensors"}}).encode(),
        e.tmp / "unet"), "error", lambda e: ["../x.safetensors", "not a file name"]),
    VerifyCase("oversized-json-is-refused-unread", lambda e: _model_dir(
        e, lambda d: os.truncate(d / "model_index.json", (64 << 20) + 1)), "error",
        lambda e: ["model_index.json", "bytes at most"]),
    VerifyCase("4-unet-keys-plus-one-lora-key", lambda e: e.file(
        "mixed.safetensors", {**e.changed(), f"{e.free_module}.lora_A.weight": torch.zeros(2, 32)}),
        "violation", lambda e: [e.victim, "mixed_file"]),
    VerifyCase("unet-file-with-keys-of-no-known-kind", lambda e: e.file(
        "extra.safetensors", {**e.weights, "conv_in.weight.diff": torch.zeros(3)}), "violation",
        lambda e: ["unrecognised", "extra.safetensors"]),
    VerifyCase("sharded-index-wins-over-the-clean-single-file", _sharded, "violation",
               lambda e: [e.victim, "diffusion_pytorch_model.safetensors"]),
    VerifyCase("modified-fp16-variant-beside-a-clean-unet", lambda e: e.unet_folder(
        "unet", e.weights, {"diffusion_pytorch_model.fp16.safetensors": {k: v.half() for k, v in e.changed().items()}}),
        "violation", lambda e: [e.victim]),
    VerifyCase("pickle-beside-clean-weights-is-reported-unread", lambda e: e.raw(
        "diffusion_pytorch_model.bin", b"never unpickled", e.unet_folder("unet", e.weights)), "violation",
        lambda e: ["diffusion_pytorch_model.bin", "unreadable"]),
    VerifyCase("model-index-names-another-unet-class", lambda e: _model_dir_with_unet_class(
        e, ["diffusers", "UNet2DModel"]), "violation", lambda e: ["component"]),
    VerifyCase("adapter-tensor-of-the-wrong-shape", lambda e: e.file(
        "lora.safetensors", {**e.adapter(e.free_module), f"unet.{e.free_module}.lora.up.weight": torch.zeros(7, 2)}),
        "violation", lambda e: [e.free_module, "adapter_shape"]),
    VerifyCase("text-encoder-adapter-under-a-guard-that-keeps-it-frozen", lambda e: e.file(
        "te.safetensors", {**e.adapter(e.free_module),
                           "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32)}),
        "violation", lambda e: ["text_encoder_adapter"]),
    VerifyCase("text-encoder-adapter-under-a-guard-that-allows-it", lambda e: e.file(
        "te.safetensors", {**e.adapter(e.free_module),
                           "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32)}),
        "compliant", guard=lambda e: Guard(**{**e.guard.__dict__, "allow_text_encoder": True})),
    VerifyCase("adapter-on-a-frozen-module", lambda e: e.file("lora.safetensors", e.adapter(e.frozen_module)),
               "violation", lambda e: [e.frozen_module, "adapter_on_frozen"]),
    VerifyCase("base-that-is-not-the-guards-base", lambda e: e.file("d.safetensors", e.changed()), "error",
               lambda e: [e.victim, "not the base"], kwargs=lambda e: {"base": e.tmp / "d.safetensors", "tolerance": 0.0}),
    VerifyCase("tolerance-nan", lambda e: e.base, "error", lambda e: ["tolerance"],
               kwargs=lambda e: {"tolerance": float("nan")}),
    VerifyCase("tolerance-negative", lambda e: e.base, "error", lambda e: ["tolerance"],
               kwargs=lambda e: {"tolerance": -1.0}),
    VerifyCase("folder-with-weights-under-no-loader-name", lambda e: e.file("odd/weights.safetensors", e.weights).parent,
               "error", lambda e: ["odd", "weights.safetensors", "no weights under a name a loader reads"]),
    VerifyCase("pickled-file", lambda e: e.raw("m.ckpt", b"x"), "error", lambda e: ["m.ckpt", "never loaded"]),
    VerifyCase("corrupt-safetensors", lambda e: e.raw("j.safetensors", b"garbage"), "error", lambda e: ["j.safetensors"]),
    VerifyCase("clean-model-directory", lambda e: e.base, "compliant"),
    VerifyCase("clean-unet-plus-clean-adapter", lambda e: e.unet_folder(
        "unet", e.weights, {"pytorch_lora_weights.safetensors": e.adapter(e.free_module)}), "compliant"),
]


def file_digests(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under `root`: what a case may not change (see data_lost)."""
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def data_lost(before: dict[str, str], after: dict[str, str]) -> str:
    """'no', or which files that existed before the case changed or vanished."""
    lost = sorted(k for k in before if after.get(k) != before[k])
    return "no" if not lost else f"yes: {', '.join(lost[:3])}"


@pytest.mark.parametrize("case", VERIFY_CASES, ids=lambda c: c.id)
def test_verify_catalogue(case: VerifyCase, env: Env, record_property):
    path = case.build(env)
    guard = case.guard(env)
    before = file_digests(env.tmp)  # verify reads its inputs and must never change them
    record_property("expected", case.expect)
    if case.expect == "error":
        with pytest.raises(AuditError) as err:
            verify(path, guard, **case.kwargs(env))
        record_property("actual", f"error: {err.value}")
        record_property("data_lost", data_lost(before, file_digests(env.tmp)))
        for s in case.names(env):
            assert s in str(err.value), (s, str(err.value))
        assert file_digests(env.tmp) == before
        return
    report = verify(path, guard, **case.kwargs(env))
    record_property("actual", "compliant" if report.compliant else
                    "violation: " + ", ".join(sorted({f.status for f in report.violations})))
    record_property("data_lost", data_lost(before, file_digests(env.tmp)))
    assert file_digests(env.tmp) == before
    assert report.compliant == (case.expect == "compliant"), report.describe()
    seen = {f.name for f in report.violations} | {f.status for f in report.violations}
    for s in case.names(env):
        assert any(s in x for x in seen), (s, report.describe())
    for s in case.notes:
        assert any(s in n for n in report.notes), (s, report.notes)


def test_names_from_a_file_cannot_forge_the_verdict_on_a_terminal(env: Env):
    """A tensor name with control characters (clear screen, carriage return, newline) is printed escaped: the
    output holds no raw control character, and the forged 'COMPLIANT' line cannot start a line."""
    from typer.testing import CliRunner

    from freezeasguard.cli import app

    forged = "\x1b[2J\rCOMPLIANT: all good\nok"
    path = env.file("evil.safetensors", {**env.changed(), forged: torch.zeros(1)})
    env.guard.save(env.tmp / "g.json")
    result = CliRunner().invoke(app, ["verify", str(path), "--guard", str(env.tmp / "g.json")])
    assert result.exit_code == 1, result.output
    assert "\x1b" not in result.output and "\r" not in result.output
    assert result.output.startswith("NOT COMPLIANT")
    assert not any(line.startswith("COMPLIANT") for line in result.output.splitlines())
    assert "\\x1b[2J\\rCOMPLIANT" in result.output  # shown, escaped


# ---------------------------------------------------------------------------- output directories
def _ft_cfg(**train) -> FinetuneConfig:
    return FinetuneConfig(train=TrainConfig(**{"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3,
                                               "progress": False, **train}))


def _finetune(env: Env, data: Any, out: Path, cfg: FinetuneConfig | None = None, **kw: Any) -> Any:
    return finetune(DiffusionModel.from_pretrained(env.base), data, guard=env.guard, config=cfg or _ft_cfg(),
                    output_dir=out, **kw)


def _user_files(out: Path, run: Callable[..., Any]) -> dict[str, bytes]:
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("mine")
    (out / "metrics.json").write_text('{"mine": true}')
    return {"model/notes.txt": b"mine", "metrics.json": b'{"mine": true}'}


def _holder(out: Path, run: Callable[..., Any]):  # type: ignore[no-untyped-def]
    """Another process holding the directory, as a second concurrent run would."""
    code = textwrap.dedent(f"""
        import sys, time
        from freezeasguard.utils.files import claim_output_dir
        with claim_output_dir({str(out)!r}, "finetune", {{}}, []):
            print("held", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "RANK": "0"})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@dataclass
class DirCase:
    id: str
    # sets up --out, given run(out, cfg=None, **kw) that fine-tunes the base into it; returns what `check` gets
    prepare: Callable[[Path, Callable[..., Any]], Any]
    act: Callable[[Env, Any, Path], Any]  # the run (env, data, out)
    error: str | None  # regex the OutputDirError must match, or None for success
    check: Callable[[Path, Any], None] = lambda out, prepared: None
    skip: str | None = None  # a reason this case cannot run here


def _check_user_files(out: Path, files: dict[str, bytes]) -> None:
    for rel, content in files.items():
        assert (out / rel).read_bytes() == content, rel


def _stale(out: Path, run: Callable[..., Any]) -> list[Any]:
    """A finished run, then a run killed with SIGKILL while it wrote a checkpoint and the model: the
    leftovers are the real ones atomic_directory leaves, not made-up names."""
    run(out)
    code = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from freezeasguard.utils.files import atomic_directory
        out = Path({str(out)!r})
        with atomic_directory(out / "checkpoints" / "step-00000009"), atomic_directory(out / "model", overwrite=True) as tmp:
            (tmp / "half.safetensors").write_bytes(b"partial")
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    proc.kill()  # SIGKILL: no cleanup runs
    proc.wait()
    ours = [p for p in list(out.glob(".model.tmp-*")) + list((out / "checkpoints").glob(".step-*.tmp-*"))]
    assert len(ours) == 2, sorted(p.name for p in out.rglob("*"))
    foreign = out / ".notes.tmp-12345678"
    foreign.write_text("not ours")
    return [ours, foreign]


def _edited_record(out: Path, run: Callable[..., Any]) -> Path:
    run(out)
    victim = out.parent / "victim.txt"
    victim.write_text("keep")
    record = json.loads((out / ".freezeasguard-run.json").read_text())
    record["products"].append("../victim.txt")
    (out / ".freezeasguard-run.json").write_text(json.dumps(record))
    return victim


def _check_stale(out: Path, prepared: Any) -> None:
    ours, foreign = prepared
    assert not any(p.exists() for p in ours), [p for p in ours if p.exists()]
    assert foreign.read_text() == "not ours"


def _holds(ok: bool, why: str) -> None:
    assert ok, why


def _no_training(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("training started before the output directory was checked")


def _failing_lora(out: Path, run: Callable[..., Any]) -> None:
    with pytest.raises(Exception, match="own tensors the guard freezes"):  # fails after claiming, before output
        run(out, FinetuneConfig(method="lora", lora_targets=("to_q",)))


def _readme(out: Path, run: Callable[..., Any]) -> None:
    out.mkdir()
    (out / "README").write_text("mine")


def _unwritable(out: Path, run: Callable[..., Any]) -> None:
    out.mkdir()
    out.chmod(0o555)


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
LR2 = _ft_cfg(learning_rate=2e-3)

DIR_CASES = [
    DirCase("5-user-files-in-out-are-refused", _user_files, lambda e, d, o: _finetune(e, d, o),
            r"not empty and not a freezeasguard finetune run", _check_user_files),
    DirCase("5-overwrite-never-deletes-files-the-tool-did-not-write", _user_files,
            lambda e, d, o: _finetune(e, d, o, overwrite=True), r"metrics\.json, model already there and not written",
            _check_user_files),
    DirCase("5-overwrite-keeps-unrelated-user-files", _readme, lambda e, d, o: _finetune(e, d, o, overwrite=True), None,
            lambda o, p: _holds((o / "README").read_text() == "mine" and (o / "model" / "model_index.json").is_file(),
                                "user file lost or model missing")),
    DirCase("5-another-configuration-is-refused", lambda o, run: run(o), lambda e, d, o: _finetune(e, d, o, LR2),
            r"another configuration \(config\.train\.learning_rate: 0\.001 -> 0\.002\)"),
    DirCase("5-another-configuration-with-overwrite-replaces-the-tools-own-results", lambda o, run: run(o),
            lambda e, d, o: _finetune(e, d, o, LR2, overwrite=True), None,
            lambda o, p: _holds(_json(o / "finetune.json")["config"]["train"]["learning_rate"] == 2e-3,
                                "finetune.json not replaced")),
    DirCase("same-configuration-resumes", lambda o, run: run(o), lambda e, d, o: _finetune(e, d, o, _ft_cfg(max_steps=3)),
            None, lambda o, p: _holds(_json(o / "metrics.json")["resumed_from"] == 2, "did not resume")),
    DirCase("a-run-that-failed-before-writing-anything-does-not-block-another-configuration", _failing_lora,
            lambda e, d, o: _finetune(e, d, o, LR2), None,
            lambda o, p: _holds((o / "model" / "model_index.json").is_file(), "no model written")),
    DirCase("edited-run-record-cannot-make-overwrite-delete-outside-out", _edited_record,
            lambda e, d, o: _finetune(e, d, o, LR2, overwrite=True), r"unreadable run record .*not plain names",
            lambda o, victim: _holds(victim.read_text() == "keep", "a file outside --out was deleted")),
    DirCase("7-a-second-concurrent-run-fails-at-once-naming-the-holder", _holder,
            lambda e, d, o: _finetune(e, d, o), r"in use by another run \(pid \d+"),
    DirCase("8-out-is-a-file", lambda o, run: o.write_text("a file"), lambda e, d, o: _finetune(e, d, o),
            r"exists and is not a directory"),
    DirCase("8-out-not-writable", _unwritable, lambda e, d, o: _finetune(e, d, o), r"not writable",
            lambda o, p: o.chmod(0o755), skip="root writes anywhere" if AS_ROOT else None),
    DirCase("8-out-under-a-file", lambda o, run: o.write_text("a file"), lambda e, d, o: _finetune(e, d, o / "sub"),
            r"cannot create the output directory"),
    DirCase("9-stale-temp-dirs-of-a-killed-run-are-cleaned", _stale, lambda e, d, o: _finetune(e, d, o), None,
            _check_stale),
]


@pytest.mark.parametrize("case", DIR_CASES, ids=lambda c: c.id)
def test_output_dir_catalogue(case: DirCase, env: Env, toy_data, tmp_path, monkeypatch, record_property):
    if case.skip:
        pytest.skip(case.skip)
    data = toy_data(4)
    out = tmp_path / "out"
    prepared = case.prepare(out, lambda o, cfg=None, **kw: _finetune(env, data, o, cfg, **kw))
    record_property("expected", f"refused: {case.error}" if case.error is not None else "completes")
    try:
        if case.error is not None:
            from freezeasguard import finetuning

            monkeypatch.setattr(finetuning, "train", _no_training)  # the refusal comes before any training
            with pytest.raises(OutputDirError, match=case.error) as err:
                case.act(env, data, out)
            record_property("actual", f"refused: {err.value}")
        else:
            case.act(env, data, out)
            record_property("actual", "completed")
        case.check(out, prepared)  # the case's own files (the user's, the run's) are as they must be
        record_property("data_lost", "no")
    finally:
        if isinstance(prepared, subprocess.Popen):
            prepared.kill()
            prepared.wait()


def test_6_learn_rerun_with_another_ratio_or_scenario_is_refused(tmp_path, toy_data):
    from freezeasguard.learn import LearnConfig, learn_guard

    def cfg(ratio):
        return LearnConfig(ratio=ratio, ratio_by="count", mask_every=1, mask_steps=1, mask_batch=2,
                           user=TrainConfig(batch_size=2, progress=False),
                           warm_start=TrainConfig(max_steps=1, batch_size=2, progress=False))

    ill, leg = toy_data(2), toy_data(2, random_flip=False)
    out = tmp_path / "g"
    first = learn_guard(build_tiny_model(TinySpec(), seed=0), ill, leg, cfg(0.3), output_dir=out,
                        provenance={"scenario": "figures"})
    with pytest.raises(OutputDirError, match=r"config\.ratio: 0\.3 -> 0\.5"):
        learn_guard(build_tiny_model(TinySpec(), seed=0), ill, leg, cfg(0.5), output_dir=out,
                    provenance={"scenario": "figures"})
    with pytest.raises(OutputDirError, match=r"provenance\.scenario: 'figures' -> 'artstyle'"):
        learn_guard(build_tiny_model(TinySpec(), seed=0), ill, leg, cfg(0.3), output_dir=out,
                    provenance={"scenario": "artstyle"})
    assert Guard.load(out / "guard.json").frozen == first.frozen  # the refused runs changed nothing
    redone = learn_guard(build_tiny_model(TinySpec(), seed=0), ill, leg, cfg(0.5), output_dir=out, overwrite=True,
                         provenance={"scenario": "figures"})
    saved = Guard.load(out / "guard.json")
    assert saved.provenance["config"]["ratio"] == 0.5 and len(saved.frozen) == round(0.5 * len(saved.names))
    assert saved.frozen == redone.frozen


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        with claim_output_dir(tmp_path / "run", "test", {}, ["a.json"]):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "run" / ".freezeasguard-run.json").stat().st_mode & 0o777 == 0o640


def test_cli_finetune_and_learn_refuse_a_foreign_out_with_exit_2(tmp_path, shared):
    from typer.testing import CliRunner

    from conftest import CAPTIONS, toy_images
    from freezeasguard.cli import app
    from freezeasguard.data import write_imagefolder

    data = write_imagefolder(tmp_path / "data", toy_images(2, 16), CAPTIONS[:2])
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("mine")
    (out / "guard.json").write_text("mine")
    for args in (["finetune", str(data), "--model", str(shared.base), "--out", str(out)],
                 ["learn", "--model", str(shared.base), "--illegal", str(data), "--legal", str(data), "--out", str(out)],
                 ["finetune", str(data), "--model", str(shared.base), "--out", str(out), "--overwrite"],
                 ["learn", "--model", str(shared.base), "--illegal", str(data), "--legal", str(data), "--out", str(out),
                  "--overwrite"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert str(out) in result.output and ("not empty" in result.output or "not written by" in result.output)
    assert (out / "metrics.json").read_text() == "mine" and (out / "guard.json").read_text() == "mine"


def test_every_file_a_user_hands_in_is_read_within_a_bound(tmp_path, record_property):
    """A config, a names list, a model index, a caption sidecar: each larger than any real one is refused,
    naming the file, before it is read (the files here are sparse: nothing is written or read)."""
    from freezeasguard.cli.options import read_config_file
    from freezeasguard.data import MAX_TEXT_BYTES, ImageCaptionFolder, ImageTransform
    from freezeasguard.errors import DataError, ModelError
    from freezeasguard.model import read_model_index
    from freezeasguard.utils.files import MAX_JSON_BYTES

    def huge(path: Path, size: int) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os.truncate(path, size + 1)
        return path

    record_property("expected", "each refused, naming the file")
    with pytest.raises(ValueError, match="config.json.*bytes at most"):
        read_config_file(huge(tmp_path / "config.json", MAX_JSON_BYTES))
    with pytest.raises(ModelError, match="model_index.json.*bytes at most"):
        read_model_index(huge(tmp_path / "model" / "model_index.json", MAX_JSON_BYTES).parent)
    folder = tmp_path / "data"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(folder / "a.png")
    huge(folder / "a.txt", MAX_TEXT_BYTES)
    with pytest.raises(DataError, match="a.txt.*bytes at most"):
        ImageCaptionFolder(folder, ImageTransform(8))
    result = subprocess.run([sys.executable, "-m", "freezeasguard", "guard", "names",
                             str(huge(tmp_path / "names.txt", MAX_JSON_BYTES)), "--out", str(tmp_path / "g")],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "names.txt" in result.stderr and "bytes at most" in result.stderr, result.stderr
    record_property("actual", "each refused, naming the file")
    record_property("data_lost", "no")
