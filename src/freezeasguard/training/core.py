"""The one training loop: data -> loss -> step, with freezing, accumulation, checkpoints and accelerate.

Pre-training, user fine-tuning, the simulated user of guard learning and the baselines all run through
`train`. What differs between them is the objective module, the data, the explicit set of trainable tensors
and the callbacks (the mask step of guard learning is one).

Determinism: the examples, augmentation and noise of global sample k are functions of (seed, k) alone, and
the global RNG is reseeded from (seed, step, rank) at every step. A run resumed from a checkpoint therefore
replays the same draws, and N processes see the same samples as one process with N x the accumulation.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..configs import RESUMABLE_CHANGES, TrainConfig
from ..data import collate_examples
from ..errors import CheckpointError, DivergedError
from ..seeding import STREAM_GLOBAL, STREAM_ORDER, derive_seed
from ..utils.files import atomic_directory, atomic_write_json
from . import memory
from .state import flatten, unflatten

CHECKPOINT_FORMAT = "freezeasguard-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class TrainContext:
    """What callbacks see. `model` is the prepared (possibly DDP-wrapped) objective: call it for a loss."""

    accelerator: Any
    model: torch.nn.Module
    objective: torch.nn.Module
    optimizer: Any
    trainable: dict[str, torch.nn.Parameter]
    config: TrainConfig
    step: int = 0  # completed optimizer steps
    loss: float | None = None
    logs: dict[str, float] = field(default_factory=dict)


class TrainCallback:
    """Per-step work plugged into the loop. State returned by state_dict() is checkpointed with the run."""

    name = "callback"

    def on_train_start(self, ctx: TrainContext) -> None:
        """Called once, after resuming, before the first step."""

    def on_before_optimizer_step(self, ctx: TrainContext) -> None:
        """Gradients of the step are accumulated (and synchronised) but not clipped."""

    def on_step_end(self, ctx: TrainContext) -> None:
        """The optimizer step is done; ctx.step counts it."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    losses: list[float]  # global mean loss of every step since step 0, resumed runs included
    metrics: dict[str, Any]
    checkpoint: Path | None


# ---------------------------------------------------------------------------- data order
class _Order:
    """Global sample k -> (dataset index, sample seed); epochs are seeded permutations."""

    def __init__(self, seed: int, n: int) -> None:
        if n < 1:
            raise ValueError("cannot train on an empty dataset")
        self.seed, self.n = seed, n
        self._perms: dict[int, list[int]] = {}

    def __call__(self, k: int) -> tuple[int, int]:
        epoch, pos = divmod(k, self.n)
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(derive_seed(self.seed, STREAM_ORDER, epoch))
            perm = torch.randperm(self.n, generator=g).tolist()
            self._perms = {epoch: perm}
        return perm[pos], derive_seed(self.seed, k)


class _MicroBatches(torch.utils.data.Sampler):
    """This process's micro-batches of (index, seed) pairs from `start` to the last step."""

    def __init__(self, order: _Order, cfg: TrainConfig, start: int, rank: int, world: int) -> None:
        self.order, self.cfg, self.start, self.rank, self.world = order, cfg, start, rank, world

    def __len__(self) -> int:
        return (self.cfg.max_steps - self.start) * self.cfg.gradient_accumulation

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b, accum = self.cfg.batch_size, self.cfg.gradient_accumulation
        global_batch = b * self.world * accum
        for step in range(self.start, self.cfg.max_steps):
            for a in range(accum):
                first = step * global_batch + (a * self.world + self.rank) * b
                yield [self.order(k) for k in range(first, first + b)]


class _Examples(torch.utils.data.Dataset):
    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, pair: tuple[int, int]) -> dict[str, Any]:
        index, seed = pair
        example = dict(self.data.example(index, seed))
        example["seeds"] = seed
        return example


# ---------------------------------------------------------------------------- helpers
def make_accelerator(mixed_precision: str = "no") -> Any:
    """An Accelerator for this machine; on a machine with no accelerator, torchrun's processes join as MULTI_CPU.

    accelerate only takes the gloo CPU path when told cpu=True, so say it when there is nothing else.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    current = getattr(torch, "accelerator", None)
    has_device = current.is_available() if current is not None else torch.cuda.is_available()
    if AcceleratorState._shared_state and str(AcceleratorState().mixed_precision) != mixed_precision:
        # accelerate keeps one precision per process; a later run with another one (a library user's second
        # fine-tune) would be refused. The distributed state is kept: only the precision is reset.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, cpu=not has_device)


def _build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)


def optimizer_state_bytes(optimizer: Any) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def _check_trainable(objective: torch.nn.Module, trainable: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    if not trainable:
        raise ValueError("nothing to train: the trainable tensor set is empty")
    owned = {id(p): n for n, p in objective.named_parameters()}
    for name, p in trainable.items():
        if id(p) not in owned:
            raise ValueError(f"trainable tensor {name!r} is not a parameter of the objective being trained")
        if not p.is_floating_point():
            raise ValueError(f"trainable tensor {name!r} has dtype {p.dtype}; only floating tensors can train")
    return dict(sorted(trainable.items()))


def release_process_group() -> None:
    """Tear down the process group (torchrun's) while the interpreter is whole. Left to interpreter exit, gloo's
    worker threads may abort the process with SIGABRT ("terminate called without an active exception") after
    the work is done, and torchrun then reports the rank as failed. A no-op outside a distributed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


class _Interrupt:
    """First Ctrl-C asks the loop to stop at the next step boundary (after a checkpoint); a second one kills."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------------------- checkpoints
def _save_checkpoint(path: Path, step: int, cfg: TrainConfig, trainable: dict[str, torch.nn.Parameter],
                     optimizer: Any, scheduler: Any, ema: Any, callbacks: Sequence[TrainCallback],
                     losses: list[float], limit: int) -> Path:
    dest = path / "checkpoints" / f"step-{step:08d}"
    tensors: dict[str, torch.Tensor] = {}
    trees: dict[str, Any] = {}
    parts: dict[str, Any] = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if ema is not None:
        parts["ema"] = ema.state_dict()
    for cb in callbacks:
        parts[f"callback/{cb.name}"] = cb.state_dict()
    for key, value in parts.items():
        t, tree = flatten(value, key)
        tensors.update(t)
        trees[key] = tree
    with atomic_directory(dest, overwrite=True) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()}, str(tmp / "trainable.safetensors"))
        save_file(tensors, str(tmp / "state.safetensors"))
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "config": cfg.to_dict(),
            "trainable": {n: list(p.shape) for n, p in trainable.items()},
            "state": trees,
            "losses": losses,
        }
        (tmp / "state.json").write_text(json.dumps(meta))
    done = sorted(p for p in (path / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    for old in done[:-limit]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def _load_checkpoint(ckpt: Path, cfg: TrainConfig, trainable: dict[str, torch.nn.Parameter]) -> tuple[int, dict[str, Any], list[float]]:
    try:
        meta = json.loads((ckpt / "state.json").read_text())
        weights = load_file(str(ckpt / "trainable.safetensors"))
        tensors = load_file(str(ckpt / "state.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"{ckpt}: unreadable checkpoint ({exc}); delete it to start over") from exc
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{ckpt}: not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} checkpoint")
    saved_cfg = meta["config"]
    now = cfg.to_dict()
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved_cfg.get(k) != now[k])
    if changed:
        detail = ", ".join(f"{k}: {saved_cfg.get(k)!r} -> {now[k]!r}" for k in changed)
        raise CheckpointError(f"{ckpt}: written by a run with another configuration ({detail}); "
                              "use a new output directory or the same settings")
    if saved_cfg["max_steps"] != cfg.max_steps and cfg.lr_schedule != "constant":
        raise CheckpointError(f"{ckpt}: max_steps changed ({saved_cfg['max_steps']} -> {cfg.max_steps}) under the "
                              f"{cfg.lr_schedule!r} schedule, which depends on it")
    if int(meta["step"]) > cfg.max_steps:
        # resuming would return weights trained past max_steps: never silently
        raise CheckpointError(f"{ckpt}: the checkpoint is at step {meta['step']}, past max_steps {cfg.max_steps}; "
                              f"ask for at least {meta['step']} steps or use a new output directory")
    expected = {n: list(p.shape) for n, p in trainable.items()}
    if meta["trainable"] != expected:
        missing = sorted(set(expected) - set(meta["trainable"]))
        extra = sorted(set(meta["trainable"]) - set(expected))
        shape = sorted(n for n in set(expected) & set(meta["trainable"]) if expected[n] != meta["trainable"][n])
        raise CheckpointError(f"{ckpt}: trains other tensors than this run (not in checkpoint: {missing[:5]}, "
                              f"only in checkpoint: {extra[:5]}, other shape: {shape[:5]})")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    state = {key: unflatten(tree, tensors) for key, tree in meta["state"].items()}
    return int(meta["step"]), state, list(meta.get("losses", []))


# ---------------------------------------------------------------------------- the loop
@dataclass
class _Run:
    """One training run's state, built by _setup, filled by _resume and _start, advanced by _loop."""

    cfg: TrainConfig
    objective: torch.nn.Module
    trainable: dict[str, torch.nn.Parameter]
    accelerator: Any
    optimizer: Any
    scheduler: Any
    ema: Any
    callbacks: Sequence[TrainCallback]
    out: Path | None
    desc: str
    start: int = 0
    losses: list[float] = field(default_factory=list)
    last_ckpt: Path | None = None
    model: Any = None  # the prepared objective
    ctx: TrainContext | None = None
    times: list[float] = field(default_factory=list)
    opt_bytes: int = 0
    rss_before: int | None = None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return list(self.trainable.values())


def train(
    objective: torch.nn.Module,
    data: Any,
    trainable: Mapping[str, torch.nn.Parameter],
    config: TrainConfig,
    *,
    output_dir: str | Path | None = None,
    resume: bool = True,
    callbacks: Sequence[TrainCallback] = (),
    accelerator: Any = None,
    desc: str = "train",
) -> TrainResult:
    """Train `trainable` (names -> parameters of `objective`) on `data`; everything else stays frozen.

    `data` has `__len__` and `example(index, seed) -> dict` (and optionally `collate`); `objective(batch)`
    returns the mean loss of a batch. With `output_dir`, checkpoints go to output_dir/checkpoints (the last
    `checkpoints_total_limit` kept) and metrics to output_dir/metrics.json; with `resume`, the latest
    checkpoint there is continued (one past `max_steps` is refused). A non-finite loss or gradient raises
    DivergedError before the optimizer step, so the weights and checkpoints stay those of the last good step.
    """
    run = _setup(objective, trainable, config, output_dir, callbacks, accelerator, desc)
    if resume and run.out is not None:
        _resume(run)
    _start(run)
    _loop(run, data)
    return _finish(run)


def _setup(objective: torch.nn.Module, trainable: Mapping[str, torch.nn.Parameter], cfg: TrainConfig,
           output_dir: str | Path | None, callbacks: Sequence[TrainCallback], accelerator: Any, desc: str) -> _Run:
    """Validate, freeze everything but `trainable`, build the optimizer, schedule and EMA."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    cfg.validate()
    trainable = _check_trainable(objective, trainable)
    keep = {id(p) for p in trainable.values()}
    # Freezing is enforced here, not left to the caller: the optimizer only ever sees `trainable`, and
    # nothing else can accumulate gradients.
    for p in objective.parameters():
        p.requires_grad_(id(p) in keep)
    params = list(trainable.values())
    optimizer = _build_optimizer(cfg, params)
    scheduler = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=cfg.max_steps)
    ema = EMAModel(params, decay=cfg.ema_decay) if cfg.ema_decay is not None else None
    return _Run(cfg, objective, trainable, accelerator or make_accelerator(cfg.mixed_precision), optimizer, scheduler,
                ema, callbacks, Path(output_dir) if output_dir is not None else None, desc)


def _resume(run: _Run) -> None:
    """Continue from the latest checkpoint in the output directory, if there is one."""
    ckpt = latest_checkpoint(run.out) if run.out is not None else None
    if ckpt is None:
        return
    run.start, state, run.losses = _load_checkpoint(ckpt, run.cfg, run.trainable)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    for cb in run.callbacks:
        cb.load_state_dict(state.get(f"callback/{cb.name}", {}))
    run.last_ckpt = ckpt


def _start(run: _Run) -> None:
    """Hand the objective and optimizer to accelerate and tell the callbacks where the run starts."""
    run.model, run.optimizer = run.accelerator.prepare(run.objective, run.optimizer)
    if run.ema is not None:
        run.ema.to(run.accelerator.device)
    run.ctx = TrainContext(run.accelerator, run.model, run.objective, run.optimizer, run.trainable, run.cfg,
                           step=run.start, loss=run.losses[-1] if run.losses else None)
    for cb in run.callbacks:
        cb.on_train_start(run.ctx)


def _loop(run: _Run, data: Any) -> None:
    """Steps from run.start to max_steps, checkpointing on schedule, at the end and on Ctrl-C."""
    from tqdm.auto import tqdm

    cfg, accelerator, ctx = run.cfg, run.accelerator, run.ctx
    assert ctx is not None
    loader = torch.utils.data.DataLoader(
        _Examples(data),
        batch_sampler=_MicroBatches(_Order(cfg.seed, len(data)), cfg, run.start, accelerator.process_index,
                                    accelerator.num_processes),
        collate_fn=getattr(data, "collate", collate_examples),
        num_workers=cfg.num_workers,
    )
    batches = iter(loader)
    run.rss_before = memory.current_rss()
    memory.reset_peak(accelerator.device)
    bar = tqdm(total=cfg.max_steps, initial=run.start, desc=run.desc,
               disable=not (cfg.progress and accelerator.is_main_process), dynamic_ncols=True)
    try:
        with _Interrupt() as interrupt:
            for step in range(run.start, cfg.max_steps):
                t0 = time.perf_counter()
                step_loss = _step(run, batches, step)
                run.losses.append(step_loss)
                ctx.step, ctx.loss = step + 1, step_loss
                for cb in run.callbacks:
                    cb.on_step_end(ctx)
                run.times.append(time.perf_counter() - t0)
                if not run.opt_bytes:
                    run.opt_bytes = optimizer_state_bytes(run.optimizer)
                if ctx.step % cfg.log_every == 0 or ctx.step == cfg.max_steps:
                    bar.set_postfix(loss=f"{step_loss:.4f}", **{k: f"{v:.4g}" for k, v in ctx.logs.items()})
                bar.update(1)
                _after_step(run, interrupt.requested)
    finally:
        bar.close()


def _step(run: _Run, batches: Iterator[Any], step: int) -> float:
    """One optimizer step over gradient_accumulation micro-batches; returns the global mean loss."""
    cfg, accelerator, model, ctx = run.cfg, run.accelerator, run.model, run.ctx
    torch.manual_seed(derive_seed(cfg.seed, STREAM_GLOBAL, step, accelerator.process_index))
    model.train()
    total = torch.zeros((), device=accelerator.device)
    for a in range(cfg.gradient_accumulation):
        batch = next(batches)
        sync = contextlib.nullcontext() if a == cfg.gradient_accumulation - 1 else accelerator.no_sync(model)
        with sync:
            loss = model(batch)
            accelerator.backward(loss / cfg.gradient_accumulation)
        total += loss.detach().float()
    # Checked before the optimizer step, so a divergence never reaches the weights: every process sees the
    # same reduced loss and the same synchronised gradients, so all stop together.
    step_loss = float(accelerator.reduce(total / cfg.gradient_accumulation, reduction="mean"))
    if not math.isfinite(step_loss):
        _diverged(run, step, f"non-finite loss ({step_loss})")
    for cb in run.callbacks:
        cb.on_before_optimizer_step(ctx)
    if cfg.max_grad_norm is not None:
        norm = accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in run.params if p.grad is not None])
    # Under fp16 the gradient scaler owns overflow: it skips the step and lowers the scale.
    if getattr(accelerator, "scaler", None) is None and norm is not None and not math.isfinite(float(norm)):
        _diverged(run, step, f"non-finite gradient (norm {float(norm)})")
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(run.params)
    return step_loss


def _diverged(run: _Run, step: int, what: str) -> None:
    run.optimizer.zero_grad(set_to_none=True)
    kept = f"; last checkpoint {run.last_ckpt}" if run.last_ckpt is not None else ""
    raise DivergedError(f"{what} at step {step + 1}: the step was not taken, the weights are those after step "
                        f"{step}{kept}; lower the learning rate or check the data")


def _after_step(run: _Run, interrupted: bool) -> None:
    """Checkpoint when due, at the last step, or when any process was interrupted (then stop)."""
    cfg, accelerator, ctx = run.cfg, run.accelerator, run.ctx
    assert ctx is not None
    stop = interrupted
    if accelerator.num_processes > 1:
        flag = torch.tensor(float(stop), device=accelerator.device)
        stop = float(accelerator.reduce(flag, reduction="sum")) > 0
    due = cfg.checkpoint_every and ctx.step % cfg.checkpoint_every == 0
    if run.out is not None and (due or ctx.step == cfg.max_steps or stop):
        run.last_ckpt = _checkpoint(accelerator, run.out, ctx.step, cfg, run.trainable, run.optimizer, run.scheduler,
                                    run.ema, run.callbacks, run.losses)
    if stop:
        where = f"; checkpoint {run.last_ckpt}, run again to resume" if run.out is not None else ""
        raise KeyboardInterrupt(f"interrupted after step {ctx.step}{where}")


def _finish(run: _Run) -> TrainResult:
    """Final weights (EMA if kept), metrics (written to metrics.json by the main process)."""
    cfg, accelerator = run.cfg, run.accelerator
    params = run.params
    if run.ema is not None:
        run.ema.copy_to(params)
    device = accelerator.device
    peak, peak_kind = memory.peak_bytes(device)
    times = run.times
    steady = times[2:] if len(times) > 4 else times
    world = accelerator.num_processes
    metrics: dict[str, Any] = {
        "desc": run.desc,
        "steps": cfg.max_steps,
        "resumed_from": run.start,
        "steps_run": len(times),
        "world_size": world,
        "global_batch": cfg.batch_size * world * cfg.gradient_accumulation,
        "device": str(device),
        "mixed_precision": cfg.mixed_precision,
        "trainable_tensors": len(params),
        "trainable_parameters": sum(p.numel() for p in params),
        "objective_parameters": sum(p.numel() for p in run.objective.parameters()),
        "optimizer_state_bytes": run.opt_bytes,
        "step_time_s": {
            "mean_after_warmup": statistics.fmean(steady) if steady else None,
            "median": statistics.median(times) if times else None,
            "first": times[0] if times else None,
        },
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "rss_before_train_bytes": run.rss_before,
        "loss": {"first": run.losses[0] if run.losses else None, "last": run.losses[-1] if run.losses else None},
        "config": cfg.to_dict(),
    }
    if run.out is not None and accelerator.is_main_process:
        atomic_write_json(run.out / "metrics.json", metrics)
    return TrainResult(steps=cfg.max_steps, resumed_from=run.start, losses=run.losses, metrics=metrics,
                       checkpoint=run.last_ckpt)


def _checkpoint(accelerator: Any, out: Path, step: int, cfg: TrainConfig, trainable: dict[str, torch.nn.Parameter],
                optimizer: Any, scheduler: Any, ema: Any, callbacks: Sequence[TrainCallback], losses: list[float]) -> Path:
    dest = out / "checkpoints" / f"step-{step:08d}"
    if accelerator.is_main_process:
        _save_checkpoint(out, step, cfg, trainable, optimizer, scheduler, ema, callbacks, losses,
                         cfg.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    return dest
