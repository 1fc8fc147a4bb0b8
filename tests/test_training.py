"""The training core: learning, freezing, accumulation, EMA, checkpoints and bit-exact resume."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from freezeasguard.errors import CheckpointError
from freezeasguard.objective import DenoisingObjective
from freezeasguard.tiny import TinySpec, build_tiny_model
from freezeasguard.training import TrainCallback, TrainConfig, train


def _setup(seed: int = 0):
    model = build_tiny_model(TinySpec(), seed=seed)
    objective = DenoisingObjective(model, caption_dropout=0.2)
    unet = {f"unet.{n}": p for n, p in model.unet.named_parameters()}
    return model, objective, unet


def _cfg(**kw):
    base = dict(max_steps=6, batch_size=4, learning_rate=2e-3, progress=False, lr_schedule="cosine",
                lr_warmup_steps=2, ema_decay=0.9, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.unet.named_parameters()}


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_loss_decreases(toy_data):
    _, objective, unet = _setup()
    result = train(objective, toy_data(8), unet, _cfg(max_steps=40, lr_schedule="constant", lr_warmup_steps=0,
                                                       ema_decay=None))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)


def test_only_the_trainable_tensors_move(toy_data):
    model, objective, unet = _setup()
    names = sorted(unet)
    trainable = {n: unet[n] for n in names[::3]}
    before = {n: p.detach().clone() for n, p in objective.named_parameters()}
    result = train(objective, toy_data(8), trainable, _cfg(max_steps=3, ema_decay=None))
    after = dict(objective.named_parameters())
    for name, p in after.items():
        moved = not torch.equal(before[name], p.detach())
        assert moved == (name in trainable), name
        assert p.requires_grad == (name in trainable)
    assert result.metrics["trainable_tensors"] == len(trainable)
    assert result.metrics["trainable_parameters"] == sum(p.numel() for p in trainable.values())
    # AdamW keeps two moments per trainable element (plus a step counter per tensor)
    expected = 2 * 4 * result.metrics["trainable_parameters"] + 4 * len(trainable)
    assert result.metrics["optimizer_state_bytes"] == expected


def test_trainable_must_belong_to_the_objective(toy_data):
    _, objective, _ = _setup()
    stray = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not a parameter of the objective"):
        train(objective, toy_data(4), {"stray": stray}, _cfg(max_steps=1))
    with pytest.raises(ValueError, match="empty"):
        train(objective, toy_data(4), {}, _cfg(max_steps=1))


def _norm(tensors):
    return sum(float(t.double().pow(2).sum()) for t in tensors.values()) ** 0.5


def test_gradient_accumulation_matches_a_larger_batch(toy_data):
    """2 micro-batches of 2 make the same update as one batch of 4; one micro-batch of 2 alone does not."""
    init = _weights(_setup()[0])

    def update(batch, accum):
        model, objective, unet = _setup()
        train(objective, toy_data(8), unet, _cfg(batch_size=batch, gradient_accumulation=accum, max_steps=3,
                                                   optimizer="sgd", learning_rate=0.05, lr_schedule="constant",
                                                   lr_warmup_steps=0, ema_decay=None))
        return {n: w - init[n] for n, w in _weights(model).items()}

    big, accumulated, half = update(4, 1), update(2, 2), update(2, 1)
    size = _norm(big)
    gap = _norm({n: big[n] - accumulated[n] for n in big})
    control = _norm({n: big[n] - half[n] for n in big})
    # measured: update norm 0.15, accumulated gap 3.0e-7 (float32 summation order), half-batch gap 5.1e-2
    assert size > 1e-2  # the weights moved, so the comparison is not vacuous
    assert gap < 1e-5 * size
    assert control > 0.1 * size  # a wrong global batch is far outside the tolerance


def test_resume_after_a_crash_is_bit_identical(toy_data, tmp_path):
    model, objective, unet = _setup()
    full = train(objective, toy_data(8), unet, _cfg(checkpoint_every=2), output_dir=tmp_path / "full")
    reference = _weights(model)

    class Crash(TrainCallback):
        name = "crash"

        def on_step_end(self, ctx):
            if ctx.step == 5:
                raise RuntimeError("simulated crash")

    _, objective, unet = _setup()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(objective, toy_data(8), unet, _cfg(checkpoint_every=2), output_dir=tmp_path / "run", callbacks=[Crash()])
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]

    model, objective, unet = _setup()
    with torch.no_grad():  # the trained tensors must come from the checkpoint, not from the initialisation
        for p in unet.values():
            p.add_(1.0)
    resumed = train(objective, toy_data(8), unet, _cfg(checkpoint_every=2), output_dir=tmp_path / "run")
    assert resumed.resumed_from == 4
    _assert_identical(reference, _weights(model))
    assert resumed.losses == full.losses
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["resumed_from"] == 4 and metrics["steps_run"] == 2


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(toy_data, tmp_path):
    model, objective, unet = _setup()
    train(objective, toy_data(8), unet, _cfg())
    reference = _weights(model)

    class CtrlC(TrainCallback):
        name = "ctrl-c"

        def on_step_end(self, ctx):
            if ctx.step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    _, objective, unet = _setup()
    with pytest.raises(KeyboardInterrupt):
        train(objective, toy_data(8), unet, _cfg(), output_dir=tmp_path / "run", callbacks=[CtrlC()])
    assert (tmp_path / "run" / "checkpoints" / "step-00000003" / "state.json").is_file()
    model, objective, unet = _setup()
    train(objective, toy_data(8), unet, _cfg(), output_dir=tmp_path / "run")
    _assert_identical(reference, _weights(model))


def test_callback_state_is_checkpointed(toy_data, tmp_path):
    class Counter(TrainCallback):
        name = "counter"

        def __init__(self):
            self.calls, self.tensor = 0, torch.zeros(2)

        def on_step_end(self, ctx):
            self.calls += 1
            self.tensor += 1

        def state_dict(self):
            return {"calls": self.calls, "tensor": self.tensor}

        def load_state_dict(self, state):
            self.calls, self.tensor = state["calls"], state["tensor"].clone()

    _, objective, unet = _setup()
    train(objective, toy_data(4), unet, _cfg(max_steps=2), output_dir=tmp_path, callbacks=[Counter()])
    counter = Counter()
    _, objective, unet = _setup()
    train(objective, toy_data(4), unet, _cfg(max_steps=2), output_dir=tmp_path, callbacks=[counter])
    assert counter.calls == 2 and torch.equal(counter.tensor, torch.full((2,), 2.0))  # restored, no step re-run


def test_resume_refuses_another_configuration(toy_data, tmp_path):
    _, objective, unet = _setup()
    train(objective, toy_data(4), unet, _cfg(max_steps=2), output_dir=tmp_path)
    _, objective, unet = _setup()
    with pytest.raises(CheckpointError, match="learning_rate"):
        train(objective, toy_data(4), unet, _cfg(max_steps=2, learning_rate=1.0), output_dir=tmp_path)
    with pytest.raises(CheckpointError, match="max_steps changed"):
        train(objective, toy_data(4), unet, _cfg(max_steps=4), output_dir=tmp_path)
    few = dict(list(unet.items())[:5])
    with pytest.raises(CheckpointError, match="other tensors"):
        train(objective, toy_data(4), few, _cfg(max_steps=2), output_dir=tmp_path)
    (tmp_path / "checkpoints" / "step-00000002" / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        train(objective, toy_data(4), unet, _cfg(max_steps=2), output_dir=tmp_path)


def test_metrics_are_recorded(toy_data, tmp_path):
    from conftest import check_train_metrics

    _, objective, unet = _setup()
    train(objective, toy_data(4), unet, _cfg(max_steps=3, gradient_accumulation=2), output_dir=tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    check_train_metrics(metrics, steps=3, global_batch=8, trainable_tensors=len(unet),
                        trainable_parameters=sum(p.numel() for p in unet.values()))
    assert metrics["resumed_from"] == 0 and metrics["config"] == _cfg(max_steps=3, gradient_accumulation=2).to_dict()


def test_config_validation():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"max_step": 3})
    # NaN passes a `<= 0` test; inf would turn every weight into NaN after one step
    for bad in (float("nan"), float("inf"), 0.0, -1e-4):
        with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
            TrainConfig(learning_rate=bad)
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(weight_decay=float("nan"))
    with pytest.raises(ValueError, match="adam_beta2"):
        TrainConfig(adam_beta2=1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        TrainConfig(max_grad_norm=float("inf"))
    TrainConfig(learning_rate=1e-3, weight_decay=0.0, adam_beta1=0.0, max_grad_norm=None)  # edges still accepted


class _PoisonedAt(torch.nn.Module):
    """The denoising objective whose `at`-th call returns NaN (one call per step without accumulation)."""

    def __init__(self, inner, at):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, batch):
        self.calls += 1
        loss = self.inner(batch)
        return loss * float("nan") if self.calls == self.at else loss


def _checkpointed(path):
    from safetensors.torch import load_file

    return load_file(str(path / "trainable.safetensors"))


def test_a_non_finite_loss_stops_before_the_step_with_the_last_checkpoint_intact(toy_data, tmp_path):
    from freezeasguard.errors import DivergedError
    from freezeasguard.training import latest_checkpoint

    _, objective, unet = _setup()
    with pytest.raises(DivergedError, match="non-finite loss .* step 3.*not taken"):
        train(_PoisonedAt(objective, 3), toy_data(8), unet, _cfg(checkpoint_every=2, ema_decay=None),
              output_dir=tmp_path)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step-00000002"
    saved = _checkpointed(ckpt)
    # the in-memory weights are the last good ones (step 2), not poisoned by the NaN step
    assert all(torch.equal(saved[n], p.detach()) for n, p in unet.items())
    assert all(torch.isfinite(p).all() for p in unet.values())


def test_a_non_finite_gradient_stops_before_the_step(toy_data, tmp_path):
    from freezeasguard.errors import DivergedError

    class NanGrad(TrainCallback):
        name = "nan-grad"

        def on_before_optimizer_step(self, ctx):
            if ctx.step == 2:  # during the third step
                next(iter(ctx.trainable.values())).grad.view(-1)[0] = float("inf")

    _, objective, unet = _setup()
    with pytest.raises(DivergedError, match="non-finite gradient .* step 3"):
        train(objective, toy_data(8), unet, _cfg(checkpoint_every=2, ema_decay=None, max_grad_norm=None),
              output_dir=tmp_path, callbacks=[NanGrad()])
    saved = _checkpointed(tmp_path / "checkpoints" / "step-00000002")
    assert all(torch.equal(saved[n], p.detach()) for n, p in unet.items())


def test_max_steps_below_the_last_checkpoint_is_refused(toy_data, tmp_path):
    _, objective, unet = _setup()
    train(objective, toy_data(4), unet, _cfg(max_steps=4, lr_schedule="constant"), output_dir=tmp_path)
    _, objective, unet = _setup()
    with pytest.raises(CheckpointError, match="at step 4, past max_steps 2"):
        train(objective, toy_data(4), unet, _cfg(max_steps=2, lr_schedule="constant"), output_dir=tmp_path)
