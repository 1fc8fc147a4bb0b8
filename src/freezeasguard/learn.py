"""Learning the guard: FreezeAsGuard's bilevel mask learning, first-order and alternating.

Per UNet tensor i a logit x_i gives a soft mask m_i = sigmoid(x_i / T) (1 = frozen). The model the simulated
user runs is theta(m) = m * theta_pre + (1 - m) * theta_ft. Two kinds of step alternate on the one
training core:

- user steps (the core's own steps): the user's optimizer (AdamW by default) moves theta_ft on the mixed
  illegal + legal data with gradient (1 - m) * g, g = dL/dtheta(m);
- a mask step after every k user steps (a callback): one backward pass of (-L_illegal + L_legal) / 2 at
  theta(m) gives dLoss/dx_i = <g_i, theta_pre_i - theta_ft_i> * m_i (1 - m_i) / T; the logits take an Adam
  step on it (scale-free, so the data, not a penalty, decides), then are shifted by one constant so that the
  mean mask equals the target ratio exactly (a projection instead of the authors' quadratic penalty, which we
  measured to dwarf the data term by four orders of magnitude); theta(m) moves with the mask.

Memory: the model's parameters hold theta(m); one flat buffer holds d = theta_pre - theta_ft. theta_pre and
theta_ft are never stored: theta_ft = theta(m) - m d and theta_pre = theta(m) + (1 - m) d. Around the user's
optimizer step the parameters are switched to theta_ft in place (p -= m d, d += p), the optimizer steps them
(so its state and weight decay are the user's), and they are switched back (d -= p, p += m d).

The result is the hard mask: the top-k tensors by learned logit (exact ratio by count, or a parameter
budget), with the logits kept as the guard's soft scores.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import collate_examples
from .guard import Guard, fingerprint_of, select_top, tensor_record
from .io import atomic_write_json
from .objective import DenoisingObjective, EncodedDataset
from .seeding import derive_seed
from .training import TrainCallback, TrainConfig, TrainContext, train
from .training.config import strict_from_dict

STREAM_MASK = 5


def _default_user() -> TrainConfig:
    # The simulated user is a real user: AdamW at the rate a user fine-tunes the embedded model with.
    return TrainConfig(max_steps=1, batch_size=32, learning_rate=1e-4, optimizer="adamw", max_grad_norm=1.0,
                       checkpoint_every=50)


def _default_warm() -> TrainConfig:
    return TrainConfig(max_steps=200, batch_size=32, learning_rate=1e-4, optimizer="adamw", checkpoint_every=100)


@dataclass
class LearnConfig:
    """Every option does something; sources: [paper] arXiv 2405.17472, [ours] measured on the embedded default."""

    ratio: float = 0.3  # [paper] 0.3 best for faces
    ratio_by: str = "params"  # a parameter budget (what freezing saves); "count": a fraction of tensors, as [paper]
    temperature: float = 0.2  # [paper] T
    mask_every: int = 5  # [paper] k: user steps between mask steps
    mask_steps: int = 60  # [ours] the paper runs ~400 on SD 1.5
    mask_batch: int = 32  # half illegal, half legal
    mask_lr: float = 0.02  # [ours] Adam on logits: each step moves a logit by about this much
    mask_optimizer: str = "adam"  # "adam" (ours) or "sgd" (the authors')
    ratio_control: str = "projection"  # "projection" (ours, exact) or "penalty" (the authors' c(rho - mean m)^2)
    penalty: float = 5e3  # [paper] c, used only with ratio_control="penalty"
    illegal_weight: float = 1.0  # upper level: -illegal_weight * L_illegal + legal_weight * L_legal, halved
    legal_weight: float = 1.0
    user: TrainConfig = field(default_factory=_default_user)  # max_steps is set to mask_steps * mask_every
    warm_start: TrainConfig = field(default_factory=_default_warm)  # the mixed fine-tune theta_ft starts from
    cache_encodings: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.user, dict):
            self.user = TrainConfig.from_dict(self.user)
        if isinstance(self.warm_start, dict):
            self.warm_start = TrainConfig.from_dict(self.warm_start)
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.ratio_by not in ("count", "params"):
            raise ValueError("ratio_by must be 'count' or 'params'")
        if self.mask_optimizer not in ("adam", "sgd"):
            raise ValueError("mask_optimizer must be 'adam' or 'sgd'")
        if self.ratio_control not in ("projection", "penalty"):
            raise ValueError("ratio_control must be 'projection' or 'penalty'")
        for name in ("temperature", "mask_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("mask_every", "mask_steps", "mask_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.mask_batch < 2:
            raise ValueError("mask_batch must hold at least one illegal and one legal sample")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LearnConfig:
        return strict_from_dict(cls, data)


# ---------------------------------------------------------------------------- pure pieces
def soft_mask(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.sigmoid(logits / temperature)


def project_to_ratio(logits: torch.Tensor, ratio: float, temperature: float,
                     weights: torch.Tensor | None = None, iters: int = 100) -> torch.Tensor:
    """Logits shifted by one constant so that the (weighted) mean soft mask equals `ratio` (bisection)."""
    w = torch.ones_like(logits) if weights is None else weights / weights.sum() * len(logits)

    def mean_mask(c: float) -> float:
        return float((soft_mask(logits + c, temperature) * w).mean())

    span = 40.0 * temperature
    lo, hi = float(-logits.max()) - span, float(-logits.min()) + span
    for _ in range(iters):
        mid = (lo + hi) / 2
        if mean_mask(mid) < ratio:
            lo = mid
        else:
            hi = mid
    return logits + (lo + hi) / 2


def mask_logit_gradient(grads: list[torch.Tensor], d_flat: torch.Tensor, lengths: torch.Tensor,
                        m: torch.Tensor, temperature: float) -> torch.Tensor:
    """dLoss/dx from g = dLoss/dtheta(m) for every tensor at once: <g_i, d_i> * m_i (1 - m_i) / T."""
    g_flat = torch.cat([g.reshape(-1) for g in grads]).to(d_flat.dtype)
    dots = torch.segment_reduce(g_flat * d_flat, "sum", lengths=lengths)
    return (dots * m * (1 - m) / temperature).to(m.dtype)


# ---------------------------------------------------------------------------- data
class MixedData:
    """Illegal and legal examples interleaved (even index illegal, odd legal), so user batches are balanced."""

    def __init__(self, illegal: Any, legal: Any) -> None:
        self.illegal, self.legal = illegal, legal
        self.n = 2 * max(len(illegal), len(legal))

    def __len__(self) -> int:
        return self.n

    def example(self, index: int, seed: int | None) -> dict[str, Any]:
        source = self.illegal if index % 2 == 0 else self.legal
        return source.example((index // 2) % len(source), seed)

    collate = staticmethod(collate_examples)


# ---------------------------------------------------------------------------- the mask learner
class MaskLearner(TrainCallback):
    """The upper level, plugged into the training core as a callback (see the module docstring)."""

    name = "mask"

    def __init__(self, params: dict[str, torch.nn.Parameter], illegal: Any, legal: Any, config: LearnConfig,
                 *, initial_d: torch.Tensor) -> None:
        self.cfg = config
        self.names = list(params)
        self.params = list(params.values())
        self.sizes = torch.tensor([p.numel() for p in self.params])
        self.lengths = self.sizes.clone()
        self.illegal, self.legal = illegal, legal
        device = self.params[0].device
        self.d = initial_d.to(device=device, dtype=self.params[0].dtype)
        self.d_views = [v.view_as(p) for v, p in zip(torch.split(self.d, self.sizes.tolist()), self.params)]
        x0 = config.temperature * math.log(config.ratio / (1 - config.ratio))
        self.logits = torch.nn.Parameter(torch.full((len(self.params),), x0, dtype=torch.float32))
        opt = torch.optim.Adam if config.mask_optimizer == "adam" else torch.optim.SGD
        self.optimizer = opt([self.logits], lr=config.mask_lr)
        self.mask_steps_done = 0
        self.initialized = False
        self.history: list[dict[str, float]] = []

    # ---------------------------------------------------------------- state
    def m(self) -> torch.Tensor:
        return soft_mask(self.logits.detach(), self.cfg.temperature)

    def _m_list(self) -> list[float]:
        return self.m().double().tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"logits": self.logits.detach().clone(), "d": self.d.detach().cpu().clone(),
                "optimizer": self.optimizer.state_dict(), "mask_steps_done": self.mask_steps_done,
                "initialized": self.initialized, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        with torch.no_grad():
            self.logits.copy_(state["logits"])
            self.d.copy_(state["d"].to(self.d))
        self.optimizer.load_state_dict(state["optimizer"])
        self.mask_steps_done = int(state["mask_steps_done"])
        self.initialized = bool(state["initialized"])
        self.history = list(state["history"])

    # ---------------------------------------------------------------- hooks
    def _follow_device(self) -> None:
        # accelerate may have moved the model since d was made (CPU -> GPU): keep d beside the parameters.
        device = self.params[0].device
        if self.d.device != device:
            self.d = self.d.to(device)
            self.d_views = [v.view_as(p) for v, p in zip(torch.split(self.d, self.sizes.tolist()), self.params)]

    @torch.no_grad()
    def on_train_start(self, ctx: TrainContext) -> None:
        self._follow_device()
        if self.initialized:
            return
        # The parameters hold theta_ft (the warm start); make them theta(m) = theta_ft + m d.
        torch._foreach_add_(self.params, torch._foreach_mul(self.d_views, self._m_list()))
        self.initialized = True

    @torch.no_grad()
    def on_before_optimizer_step(self, ctx: TrainContext) -> None:
        m = self._m_list()
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            raise RuntimeError("a UNet tensor got no gradient in a user step")
        torch._foreach_mul_(grads, [1.0 - v for v in m])  # dL/dtheta_ft = (1 - m) g
        torch._foreach_sub_(self.params, torch._foreach_mul(self.d_views, m))  # p = theta_ft
        torch._foreach_add_(self.d_views, self.params)  # d = theta_pre (transiently)

    @torch.no_grad()
    def on_step_end(self, ctx: TrainContext) -> None:
        torch._foreach_sub_(self.d_views, self.params)  # d = theta_pre - theta_ft'
        torch._foreach_add_(self.params, torch._foreach_mul(self.d_views, self._m_list()))  # p = theta(m)
        if ctx.step % self.cfg.mask_every == 0:
            self.mask_step(ctx)

    # ---------------------------------------------------------------- the mask step
    def _mask_batch(self, ctx: TrainContext) -> dict[str, Any]:
        acc = ctx.accelerator
        world, rank = acc.num_processes, acc.process_index
        half = self.cfg.mask_batch // 2
        per = max(1, half // world)
        j = self.mask_steps_done
        examples = []
        weights = []
        for side, data, w in ((0, self.illegal, -self.cfg.illegal_weight), (1, self.legal, self.cfg.legal_weight)):
            for r in range(rank * per, rank * per + per):
                seed = derive_seed(self.cfg.seed, STREAM_MASK, j, side, r)
                index = derive_seed(seed, 1) % len(data)
                ex = dict(data.example(index, seed))
                ex["seeds"] = seed
                examples.append(ex)
                weights.append(0.5 * w / per)
        batch = collate_examples(examples)
        batch["weights"] = torch.tensor(weights)
        return batch

    def mask_step(self, ctx: TrainContext) -> None:
        batch = self._mask_batch(ctx)
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            loss = ctx.model(batch)
            ctx.accelerator.backward(loss)
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            m_old = self.m()
            grad = mask_logit_gradient(grads, self.d, self.lengths.to(self.d.device), m_old.to(self.d.device),
                                       self.cfg.temperature).cpu()
            if self.cfg.ratio_control == "penalty":
                w = self._ratio_weights()
                mean_m = float((m_old * w).sum() / w.sum())
                grad = grad + 2 * self.cfg.penalty * (mean_m - self.cfg.ratio) * (w / w.sum()) * m_old * (1 - m_old) / self.cfg.temperature
            self.logits.grad = grad.float()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.cfg.ratio_control == "projection":
                self.logits.copy_(project_to_ratio(self.logits.detach(), self.cfg.ratio, self.cfg.temperature,
                                                   self._ratio_weights()))
            delta = (self.m() - m_old).double().tolist()
            # theta(m) = theta_pre - (1 - m) d, so a new mask moves it by (m_new - m_old) d
            torch._foreach_add_(self.params, torch._foreach_mul(self.d_views, delta))
            for p in self.params:
                p.grad = None
        per_sample = getattr(ctx.objective, "last_per_sample", None)
        half = len(batch["weights"]) // 2
        entry = {"mask_step": self.mask_steps_done + 1, "user_step": ctx.step, "loss": float(loss.detach()),
                 "hard_ratio": float((self.m() > 0.5).float().mean()), "soft_ratio": float(self.m().mean())}
        if per_sample is not None and len(per_sample) == 2 * half:
            entry["illegal_loss"] = float(per_sample[:half].mean())
            entry["legal_loss"] = float(per_sample[half:].mean())
        self.history.append(entry)
        self.mask_steps_done += 1
        ctx.logs.update({k: entry[k] for k in ("illegal_loss", "legal_loss", "hard_ratio") if k in entry})

    def _ratio_weights(self) -> torch.Tensor:
        return self.sizes.float() if self.cfg.ratio_by == "params" else torch.ones(len(self.sizes))

    def scores(self) -> dict[str, float]:
        return {n: float(x) for n, x in zip(self.names, self.logits.detach())}


# ---------------------------------------------------------------------------- the API
def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


def learn_mask(objective: torch.nn.Module, params: dict[str, torch.nn.Parameter], illegal: Any, legal: Any,
               config: LearnConfig, *, output_dir: str | Path | None = None, warm_start_params: dict[str, torch.Tensor] | None = None,
               accelerator: Any = None) -> tuple[MaskLearner, dict[str, Any]]:
    """The generic learner: `params` (names -> parameters of `objective`) hold theta_pre on entry and are left
    at theta(m). `objective(batch)` must honour per-sample `weights`. Returns the learner (logits, history)
    and timing/metrics."""
    out = Path(output_dir) if output_dir is not None else None
    plist = list(params.values())
    theta_pre = _flat(plist)  # becomes d once theta_ft is known (the only extra copy)
    mixed = MixedData(illegal, legal)
    t0 = time.perf_counter()
    warm_metrics: dict[str, Any] = {}
    if warm_start_params is not None:
        with torch.no_grad():
            for name, p in params.items():
                if name not in warm_start_params:
                    raise ValueError(f"warm-start weights lack tensor {name!r}")
                p.copy_(warm_start_params[name].to(p))
    else:
        warm_cfg = TrainConfig.from_dict({**config.warm_start.to_dict(), "seed": config.seed})
        warm = train(objective, mixed, params, warm_cfg, output_dir=None if out is None else out / "warm-start",
                     accelerator=accelerator, desc="warm start (mixed fine-tune)")
        warm_metrics = warm.metrics
    warm_seconds = time.perf_counter() - t0
    with torch.no_grad():
        d = theta_pre.sub_(_flat(plist))  # theta_pre - theta_ft
    learner = MaskLearner(params, illegal, legal, config, initial_d=d)
    user_cfg = TrainConfig.from_dict({**config.user.to_dict(), "seed": config.seed + 1,
                                      "max_steps": config.mask_steps * config.mask_every, "ema_decay": None})
    t1 = time.perf_counter()
    result = train(objective, mixed, params, user_cfg, output_dir=None if out is None else out / "mask-learning",
                   callbacks=[learner], accelerator=accelerator, desc="learn guard")
    metrics = {"warm_start_seconds": warm_seconds, "learning_seconds": time.perf_counter() - t1,
               "warm_start": warm_metrics, "learning": result.metrics, "history": learner.history}
    return learner, metrics


def learn_guard(model: Any, illegal: Any, legal: Any, config: LearnConfig | None = None, *,
                output_dir: str | Path | None = None, warm_start_model: Any = None, accelerator: Any = None,
                provenance: dict[str, Any] | None = None) -> Guard:
    """Learn a guard for `model` (a DiffusionModel holding the base weights) from the publisher's illegal and
    legal image-caption datasets. The model's UNet is left at theta(m); reload the base to release it.

    With `output_dir`: warm-start and learning checkpoints (rerun to resume), guard.json, learn.json
    (config, history, timing) and mask.png (the freeze per UNet block).
    """
    from .guard import unet_tensors
    from .plots import plot_guard

    cfg = config or LearnConfig()
    unet = model.unet
    base_tensors = unet_tensors(unet)
    fingerprint = fingerprint_of(base_tensors)
    records = {n: tensor_record(t) for n, t in base_tensors.items()}
    sizes = {n: t.numel() for n, t in base_tensors.items()}
    if cfg.cache_encodings:
        with torch.no_grad():
            illegal_data, legal_data = EncodedDataset(model, illegal), EncodedDataset(model, legal)
    else:
        illegal_data, legal_data = illegal, legal
    objective = DenoisingObjective(model)
    params = {f"unet.{n}": p for n, p in unet.named_parameters()}
    warm = None
    if warm_start_model is not None:
        warm = {f"unet.{n}": t for n, t in unet_tensors(warm_start_model.unet).items()}
    learner, metrics = learn_mask(objective, params, illegal_data, legal_data, cfg, output_dir=output_dir,
                                  warm_start_params=warm, accelerator=accelerator)
    scores = {n.removeprefix("unet."): s for n, s in learner.scores().items()}
    frozen = select_top(scores, sizes, cfg.ratio, by=cfg.ratio_by)
    prov = {
        "method": "freezeasguard (bilevel mask learning, first-order, alternating)",
        "config": cfg.to_dict(),
        "illegal": _manifest(illegal),
        "legal": _manifest(legal),
        "timing_seconds": {"warm_start": metrics["warm_start_seconds"], "learning": metrics["learning_seconds"]},
        "versions": _versions(),
        **(provenance or {}),
    }
    guard = Guard(frozen=tuple(sorted(frozen)), fingerprint=fingerprint, tensors={n: records[n] for n in sorted(frozen)},
                  method="learned", scores=scores, provenance=prov,
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if output_dir is not None:
        out = Path(output_dir)
        guard.save(out / "guard.json")
        atomic_write_json(out / "learn.json", {"config": cfg.to_dict(), "summary": guard.summary(),
                                               "history": learner.history,
                                               "timing_seconds": prov["timing_seconds"],
                                               "user_step_time_s": metrics["learning"]["step_time_s"]})
        plot_guard(guard, out / "mask.png")
    return guard


def _manifest(data: Any) -> Any:
    fn = getattr(data, "manifest", None)
    if fn is None:
        return {"items": len(data)}
    items = fn()
    return {"items": len(items), "files": items}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("freezeasguard", "torch", "diffusers", "transformers", "accelerate", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
