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

Options beyond the paper (measured in docs/results.md; the defaults are unchanged): `mask_optimizer="sgd-normalised"` takes plain SGD
steps divided by one scale fixed at the first mask step (the RMS of that step's logit gradient), so a tensor
whose gradient is 10x larger moves 10x further, where Adam moves every logit by about `mask_lr` and so ranks
by how consistently a gradient kept its sign; `"sgd"` with `ratio_control="penalty"` is the authors' update.
`temperature_schedule` anneals T toward `temperature_final` over the mask steps, which polarises the soft
mask (the projection re-centres the logits at each new T). Every mask step logs the hard and soft ratios and
the polarisation (share with m < 0.05 or m > 0.95), by tensors and by parameters.

Ranking check: after learning, for each domain, the first-order change of the loss at theta_ft (the simulated
user's fine-tuned weights) when tensor i is restored to the release, <dL/dtheta_i, theta_pre_i - theta_ft_i>,
summed over the frozen set (`restore_effect`); written to learn.json. A guard that ranks well raises the
illegal loss and barely moves the legal one; no fine-tune is needed to see it.

Memory: the model's parameters hold theta(m); one flat buffer holds d = theta_pre - theta_ft. theta_pre and
theta_ft are never stored: theta_ft = theta(m) - m d and theta_pre = theta(m) + (1 - m) d. Around the user's
optimizer step the parameters are switched to theta_ft in place (p -= m d, d += p), the optimizer steps them
(so its state and weight decay are the user's, and its clipping acts on the user's gradient (1 - m) g), and
they are switched back (d -= p, p += m d). Every update is in place tensor by tensor, and the mask step's dot
products <g_i, d_i> are taken per tensor: beyond the one backward pass's gradients, no step allocates a
model-size buffer.

Mixed precision: under fp16 accelerate scales the loss; the mask step unscales its gradients by the scaler's
scale and skips (and logs) a step whose gradient is not finite, as the scaler does for the user's step.

Data: user batches (and the warm start's) are exactly half illegal, half legal, as the upper level assumes:
the core draws (illegal, legal) pairs (`MixedData`), so its seeded permutation cannot unbalance a batch.

The result is the hard mask: the top-k tensors by learned logit (exact ratio by count, or a parameter
budget), with the logits kept as the guard's soft scores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .configs import RATIO_BY_DEFAULT, check_ratio_by, strict_from_dict
from .data import collate_examples
from .guard import Guard, fingerprint_of, select_top, tensor_record
from .objective import DenoisingObjective, EncodedDataset
from .seeding import STREAM_LEARN_SAMPLE, STREAM_MASK, STREAM_RANKING, derive_seed
from .training import TrainCallback, TrainConfig, TrainContext, TrainResult, train
from .utils.files import atomic_write_json, canonical_digest, claim_output_dir

MASK_OPTIMIZERS = ("adam", "sgd", "sgd-normalised")
TEMPERATURE_SCHEDULES = ("constant", "linear", "geometric")
POLARISED = 0.05  # a soft mask value within this of 0 or 1 counts as polarised


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
    ratio_by: str = RATIO_BY_DEFAULT  # a parameter budget (what freezing saves); "count": a fraction of tensors, as [paper]
    temperature: float = 0.2  # [paper] T
    mask_every: int = 5  # [paper] k: user steps between mask steps
    mask_steps: int = 60  # [ours] the paper runs ~400 on SD 1.5
    mask_batch: int = 32  # half illegal, half legal (as every user batch)
    mask_lr: float = 0.02  # [ours] Adam on logits: each step moves a logit by about this much
    # "adam" (ours: about mask_lr per logit and step, whatever the gradient's size), "sgd" (the authors'), or
    # "sgd-normalised" (SGD, gradient divided by one scale fixed at the first mask step: magnitude-aware)
    mask_optimizer: str = "adam"
    temperature_schedule: str = "constant"  # or "linear" / "geometric": T anneals to temperature_final
    temperature_final: float = 0.02  # T after the last mask step, when temperature_schedule anneals
    ratio_control: str = "projection"  # "projection" (ours, exact) or "penalty" (the authors' c(rho - mean m)^2)
    penalty: float = 5e3  # [paper] c, used only with ratio_control="penalty"
    illegal_weight: float = 1.0  # upper level: -illegal_weight * L_illegal + legal_weight * L_legal, halved
    legal_weight: float = 1.0
    ranking_samples: int = 16  # per domain, for the ranking check in learn.json (0: skip it)
    # batch_size counts samples (even: half illegal, half legal); max_steps is set to mask_steps * mask_every
    user: TrainConfig = field(default_factory=_default_user)
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
        check_ratio_by(self.ratio_by)
        if self.mask_optimizer not in MASK_OPTIMIZERS:
            raise ValueError(f"mask_optimizer must be one of {MASK_OPTIMIZERS}, got {self.mask_optimizer!r}")
        if self.temperature_schedule not in TEMPERATURE_SCHEDULES:
            raise ValueError(f"temperature_schedule must be one of {TEMPERATURE_SCHEDULES}, "
                             f"got {self.temperature_schedule!r}")
        if self.ranking_samples < 0:
            raise ValueError("ranking_samples must be >= 0")
        if self.ratio_control not in ("projection", "penalty"):
            raise ValueError("ratio_control must be 'projection' or 'penalty'")
        for name in ("temperature", "temperature_final", "mask_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("mask_every", "mask_steps", "mask_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.mask_batch < 2:
            raise ValueError("mask_batch must hold at least one illegal and one legal sample")
        for name in ("user", "warm_start"):
            if getattr(self, name).batch_size % 2:
                raise ValueError(f"LearnConfig.{name}.batch_size must be even (half illegal, half legal), "
                                 f"got {getattr(self, name).batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LearnConfig:
        return strict_from_dict(cls, data)


# ---------------------------------------------------------------------------- pure pieces
def soft_mask(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.sigmoid(logits / temperature)


def temperature_at(config: LearnConfig, steps_done: int) -> float:
    """T after `steps_done` of config.mask_steps mask steps: constant, or annealed (linearly or geometrically)
    from config.temperature to config.temperature_final at the last mask step."""
    t0, t1 = config.temperature, config.temperature_final
    f = min(steps_done, config.mask_steps) / config.mask_steps
    if config.temperature_schedule == "linear":
        return t0 + (t1 - t0) * f
    if config.temperature_schedule == "geometric":
        return t0 * (t1 / t0) ** f
    return t0


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


def tensor_dots(grads: list[torch.Tensor], others: list[torch.Tensor]) -> torch.Tensor:
    """<g_i, d_i> for every tensor i, one dot product each: no concatenated copy, no elementwise product."""
    dots = [torch.dot(g.reshape(-1), d.reshape(-1).to(g.dtype)) for g, d in zip(grads, others)]
    return torch.stack(dots).to(others[0].dtype)


def mask_logit_gradient(grads: list[torch.Tensor], d_views: list[torch.Tensor], m: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """dLoss/dx from g = dLoss/dtheta(m) for every tensor: <g_i, d_i> * m_i (1 - m_i) / T."""
    dots = tensor_dots(grads, d_views).to(m.device)
    return (dots * m * (1 - m) / temperature).to(m.dtype)


def add_scaled_(targets: list[torch.Tensor], sources: list[torch.Tensor], scales: list[float]) -> None:
    """targets[i] += scales[i] * sources[i], in place; unlike torch._foreach_mul, no model-size temporary."""
    for t, s, c in zip(targets, sources, scales):
        t.add_(s, alpha=c)


def mask_shares(m: torch.Tensor, sizes: torch.Tensor) -> dict[str, float]:
    """The soft mask's mean, the hard mask's (m > 0.5) share and the polarised share (m < 0.05 or m > 0.95),
    each by tensor count and by parameter count."""
    m, w = m.double().cpu(), sizes.double().cpu()
    out = {}
    for key, v in (("soft_ratio", m), ("hard_ratio", (m > 0.5).double()),
                   ("polarisation", ((m < POLARISED) | (m > 1 - POLARISED)).double())):
        out[f"{key}_tensors"] = float(v.mean())
        out[f"{key}_params"] = float((v * w).sum() / w.sum())
    return out


def loss_scale(accelerator: Any) -> float:
    """The factor accelerator.backward multiplied the loss by: the fp16 gradient scaler's scale, else 1."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


# ---------------------------------------------------------------------------- data
class MixedData:
    """(illegal, legal) pairs: item i is illegal[i mod n_illegal] and legal[i mod n_legal], each drawn with its
    own seed derived from the item's. The collate flattens b items to b illegal then b legal samples.

    The training core permutes item indices, so interleaving single samples could not balance a batch; pairs
    make every batch and micro-batch exactly half and half, and item k's draws stay a function of (seed, k).
    The core's batch_size therefore counts pairs: train through `train_mixed`, which takes samples."""

    def __init__(self, illegal: Any, legal: Any) -> None:
        if len(illegal) < 1 or len(legal) < 1:
            raise ValueError(f"guard learning needs illegal and legal samples, got {len(illegal)} and {len(legal)}")
        self.illegal, self.legal = illegal, legal

    def __len__(self) -> int:
        return max(len(self.illegal), len(self.legal))

    def example(self, index: int, seed: int | None) -> dict[str, Any]:
        pair = []
        for side, source in enumerate((self.illegal, self.legal)):
            sub = None if seed is None else derive_seed(seed, side)
            ex = dict(source.example(index % len(source), sub))
            if sub is not None:
                ex["seeds"] = sub
            pair.append(ex)
        return {"pair": tuple(pair)}

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_examples([it["pair"][0] for it in items] + [it["pair"][1] for it in items])


def train_mixed(objective: torch.nn.Module, illegal: Any, legal: Any, trainable: dict[str, torch.nn.Parameter],
                config: TrainConfig, **kwargs: Any) -> TrainResult:
    """`train` on balanced illegal + legal batches; config.batch_size counts samples and must be even."""
    if config.batch_size % 2:
        raise ValueError(f"a mixed batch is half illegal, half legal: batch_size must be even, got {config.batch_size}")
    return train(objective, MixedData(illegal, legal), trainable, replace(config, batch_size=config.batch_size // 2),
                 **kwargs)


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
        self.illegal, self.legal = illegal, legal
        device = self.params[0].device
        self.d = initial_d.to(device=device, dtype=self.params[0].dtype)
        self.d_views = [v.view_as(p) for v, p in zip(torch.split(self.d, self.sizes.tolist()), self.params)]
        x0 = config.temperature * math.log(config.ratio / (1 - config.ratio))
        self.logits = torch.nn.Parameter(torch.full((len(self.params),), x0, dtype=torch.float32))
        opt = torch.optim.Adam if config.mask_optimizer == "adam" else torch.optim.SGD
        self.optimizer = opt([self.logits], lr=config.mask_lr)
        self.temperature = temperature_at(config, 0)
        self.grad_scale: float | None = None  # sgd-normalised: the first mask gradient's RMS
        self.mask_steps_done = 0
        self.initialized = False
        self.history: list[dict[str, float]] = []

    # ---------------------------------------------------------------- state
    def m(self) -> torch.Tensor:
        return soft_mask(self.logits.detach(), self.temperature)

    def _m_list(self) -> list[float]:
        return self.m().double().tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"logits": self.logits.detach().clone(), "d": self.d.detach().cpu().clone(),
                "optimizer": self.optimizer.state_dict(), "mask_steps_done": self.mask_steps_done,
                "initialized": self.initialized, "history": self.history, "temperature": self.temperature,
                "grad_scale": self.grad_scale}

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
        self.temperature = float(state.get("temperature", self.cfg.temperature))
        self.grad_scale = state.get("grad_scale")

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
        add_scaled_(self.params, self.d_views, self._m_list())
        self.initialized = True

    @torch.no_grad()
    def on_before_optimizer_step(self, ctx: TrainContext) -> None:
        m = self._m_list()
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            raise RuntimeError("a UNet tensor got no gradient in a user step")
        torch._foreach_mul_(grads, [1.0 - v for v in m])  # dL/dtheta_ft = (1 - m) g, clipped after this hook
        add_scaled_(self.params, self.d_views, [-v for v in m])  # p = theta_ft
        torch._foreach_add_(self.d_views, self.params)  # d = theta_pre (transiently)

    @torch.no_grad()
    def on_step_end(self, ctx: TrainContext) -> None:
        torch._foreach_sub_(self.d_views, self.params)  # d = theta_pre - theta_ft'
        add_scaled_(self.params, self.d_views, self._m_list())  # p = theta(m)
        if ctx.step % self.cfg.mask_every == 0:
            self.mask_step(ctx)

    # ---------------------------------------------------------------- the mask step
    def _draw(self, side: int, positions: range, *keys: int) -> list[dict[str, Any]]:
        """Samples of one domain (0 illegal, 1 legal) at global positions, each a function of the seed and keys."""
        data = self.illegal if side == 0 else self.legal
        examples = []
        for r in positions:
            seed = derive_seed(self.cfg.seed, *keys, side, r)
            ex = dict(data.example(derive_seed(seed, STREAM_LEARN_SAMPLE) % len(data), seed))
            ex["seeds"] = seed
            examples.append(ex)
        return examples

    def _mask_batch(self, ctx: TrainContext) -> dict[str, Any]:
        acc = ctx.accelerator
        world, rank = acc.num_processes, acc.process_index
        half = self.cfg.mask_batch // 2
        per = max(1, half // world)
        examples: list[dict[str, Any]] = []
        weights: list[float] = []
        for side, w in ((0, -self.cfg.illegal_weight), (1, self.cfg.legal_weight)):
            examples += self._draw(side, range(rank * per, rank * per + per), STREAM_MASK, self.mask_steps_done)
            weights += [0.5 * w / per] * per
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
        scale = loss_scale(ctx.accelerator)
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            if scale != 1.0:  # fp16: the gradients are of scale * loss
                torch._foreach_mul_(grads, 1.0 / scale)
            m_old = self.m()
            grad = mask_logit_gradient(grads, self.d_views, m_old.to(self.d.device), self.temperature).cpu()
            del grads
            for p in self.params:
                p.grad = None  # free the gradients before theta(m) moves
            # An overflow (fp16) or a NaN must not reach the logits, Adam's moments or theta(m): skip the step.
            skipped = not bool(torch.isfinite(grad).all())
            if not skipped:
                self._update_logits(grad, m_old)
                # in float64: a float32 difference of two masks far apart is not exact, and its error would
                # move theta(m) off m theta_pre + (1 - m) theta_ft
                delta = (self.m().double() - m_old.double()).tolist()
                # theta(m) = theta_pre - (1 - m) d, so a new mask moves it by (m_new - m_old) d
                add_scaled_(self.params, self.d_views, delta)
        per_sample = getattr(ctx.objective, "last_per_sample", None)
        half = len(batch["weights"]) // 2
        shares = mask_shares(self.m(), self.sizes)
        by = "params" if self.cfg.ratio_by == "params" else "tensors"
        entry: dict[str, Any] = {"mask_step": self.mask_steps_done + 1, "user_step": ctx.step,
                                 "loss": float(loss.detach()), "skipped": skipped, "loss_scale": scale,
                                 "temperature": self.temperature,
                                 "hard_ratio": shares[f"hard_ratio_{by}"], "soft_ratio": shares[f"soft_ratio_{by}"],
                                 "polarisation": shares[f"polarisation_{by}"], **shares}
        if per_sample is not None and len(per_sample) == 2 * half:
            entry["illegal_loss"] = float(per_sample[:half].mean())
            entry["legal_loss"] = float(per_sample[half:].mean())
        self.history.append(entry)
        self.mask_steps_done += 1
        ctx.logs.update({k: entry[k] for k in ("illegal_loss", "legal_loss", "hard_ratio", "polarisation") if k in entry})

    def _update_logits(self, grad: torch.Tensor, m_old: torch.Tensor) -> None:
        if self.cfg.ratio_control == "penalty":
            w = self._ratio_weights()
            mean_m = float((m_old * w).sum() / w.sum())
            grad = grad + 2 * self.cfg.penalty * (mean_m - self.cfg.ratio) * (w / w.sum()) * m_old * (1 - m_old) / self.temperature
        if self.cfg.mask_optimizer == "sgd-normalised":
            if self.grad_scale is None:  # fixed once per run, so relative gradient sizes decide the steps
                rms = float(grad.double().pow(2).mean().sqrt())
                self.grad_scale = rms if rms > 0 else None
            if self.grad_scale is not None:
                grad = grad / self.grad_scale
        self.logits.grad = grad.float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # the schedule's next T; the projection below and theta(m) use it from now on
        self.temperature = temperature_at(self.cfg, self.mask_steps_done + 1)
        if self.cfg.ratio_control == "projection":
            self.logits.copy_(project_to_ratio(self.logits.detach(), self.cfg.ratio, self.temperature,
                                               self._ratio_weights()))

    @torch.no_grad()
    def restore_effect(self, objective: torch.nn.Module) -> dict[str, list[float]]:
        """Per tensor and domain, <dL/dtheta_i, d_i> at theta_ft on `ranking_samples` samples per domain: the
        first-order change of that domain's loss when tensor i alone is restored from theta_ft to theta_pre.
        The parameters are moved to theta_ft in place and back to theta(m) (to rounding)."""
        n = self.cfg.ranking_samples
        m = self._m_list()
        add_scaled_(self.params, self.d_views, [-v for v in m])  # theta_ft
        try:
            out = {}
            for side, domain in ((0, "illegal"), (1, "legal")):
                out[domain] = restore_dots(objective, self.params, self.d_views,
                                           collate_examples(self._draw(side, range(n), STREAM_RANKING)))
        finally:
            add_scaled_(self.params, self.d_views, m)
        return out

    def _ratio_weights(self) -> torch.Tensor:
        return self.sizes.float() if self.cfg.ratio_by == "params" else torch.ones(len(self.sizes))

    def scores(self) -> dict[str, float]:
        return {n: float(x) for n, x in zip(self.names, self.logits.detach())}


def restore_dots(objective: torch.nn.Module, params: list[torch.nn.Parameter], d_views: list[torch.Tensor],
                 batch: dict[str, Any]) -> list[float]:
    """<dL/dtheta_i, d_i> for every tensor i, L = objective(batch) at the parameters' current values: the
    first-order change of L when tensor i alone moves by d_i."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    with torch.enable_grad():
        objective(batch).backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    dots = tensor_dots(grads, d_views).double().cpu().tolist()
    for p, g in zip(params, saved):
        p.grad = g
    return dots


def ranking_check(effect: dict[str, list[float]], names: list[str], frozen: set[str], top: int = 10) -> dict[str, Any]:
    """Summarise restore_effect for a frozen set: per domain, the predicted loss change of restoring the frozen
    tensors (their sum), of restoring everything (back to the base), and the frozen share of the latter."""
    out: dict[str, Any] = {"evaluated_at": "theta_ft (the simulated user's fine-tuned weights)",
                           "meaning": "first-order change of each domain's loss when the frozen tensors are "
                                      "restored to the release: sum over frozen i of <dL/dtheta_i, "
                                      "theta_pre_i - theta_ft_i>; a selective guard raises the illegal loss "
                                      "and barely moves the legal one"}
    per = {domain: dict(zip(names, dots)) for domain, dots in effect.items()}
    for domain, by_name in per.items():
        frozen_sum = sum(v for n, v in by_name.items() if n in frozen)
        total = sum(by_name.values())
        out[domain] = {"frozen": frozen_sum, "all": total, "frozen_share_of_all": frozen_sum / total if total else None}
    ill, leg = per["illegal"], per["legal"]
    order = sorted((n for n in names if n in frozen), key=lambda n: -ill[n])
    out["top_frozen"] = [{"tensor": n, "illegal": ill[n], "legal": leg[n]} for n in order[:top]]
    return out


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
    t0 = time.perf_counter()
    warm_metrics: dict[str, Any] = {}
    if warm_start_params is not None:
        with torch.no_grad():
            for name, p in params.items():
                if name not in warm_start_params:
                    raise ValueError(f"warm-start weights lack tensor {name!r}")
                p.copy_(warm_start_params[name].to(p))
    else:
        warm = train_mixed(objective, illegal, legal, params, replace(config.warm_start, seed=config.seed),
                           output_dir=None if out is None else out / "warm-start", accelerator=accelerator,
                           desc="warm start (mixed fine-tune)")
        warm_metrics = warm.metrics
    warm_seconds = time.perf_counter() - t0
    with torch.no_grad():
        d = theta_pre.sub_(_flat(plist))  # theta_pre - theta_ft
    learner = MaskLearner(params, illegal, legal, config, initial_d=d)
    user_cfg = replace(config.user, seed=config.seed + 1, max_steps=config.mask_steps * config.mask_every,
                       ema_decay=None)
    t1 = time.perf_counter()
    result = train_mixed(objective, illegal, legal, params, user_cfg,
                         output_dir=None if out is None else out / "mask-learning", callbacks=[learner],
                         accelerator=accelerator, desc="learn guard")
    metrics = {"warm_start_seconds": warm_seconds, "learning_seconds": time.perf_counter() - t1,
               "warm_start": warm_metrics, "learning": result.metrics, "history": learner.history}
    return learner, metrics


def learn_guard(model: Any, illegal: Any, legal: Any, config: LearnConfig | None = None, *,
                output_dir: str | Path | None = None, warm_start_model: Any = None, accelerator: Any = None,
                provenance: dict[str, Any] | None = None, overwrite: bool = False,
                always_frozen: Sequence[str] = ()) -> Guard:
    """Learn a guard for `model` (a DiffusionModel holding the base weights) from the publisher's illegal and
    legal image-caption datasets. The model's UNet is left at theta(m); reload the base to release it.

    With `output_dir`: warm-start and learning checkpoints (rerun to resume), guard.json, learn.json
    (config, per-mask-step history, ranking check, timing), learn.png (the history's ratios, polarisation,
    temperature and losses per mask step) and mask.png (the freeze per UNet block).
    The directory is owned by the run (`io.claim_output_dir`): a rerun with another configuration, data or
    provenance is refused unless `overwrite` (it would otherwise resume the old run and write a guard whose
    provenance lies).

    `always_frozen`: UNet tensors the guard freezes whatever the mask says (a set the publisher has already
    decided, such as immunised cross-attention). They stay at the model's values in the warm start and in the
    simulated user, as the real user will find them, are not candidates, and count toward the ratio: the mask
    spends only what is left of the budget.
    """
    cfg = config or LearnConfig()
    fixed = sorted(set(always_frozen))
    # Checked before the directory is claimed: a fixed set that leaves the mask nothing is refused before any work.
    mask_ratio = budget_left(model.unet, fixed, cfg) if fixed else cfg.ratio
    identity = _run_identity(model, illegal, legal, cfg, warm_start_model, provenance) if output_dir is not None else {}
    if fixed:
        identity["always_frozen"] = fixed
    products = ("guard.json", "learn.json", "learn.png", "mask.png", "warm-start", "mask-learning")
    with claim_output_dir(output_dir, "learn", identity, products, overwrite=overwrite,
                          main=getattr(accelerator, "is_main_process", None)):
        return _learn_guard(model, illegal, legal, cfg, output_dir=output_dir, warm_start_model=warm_start_model,
                            accelerator=accelerator, provenance=provenance, always_frozen=fixed,
                            mask_ratio=mask_ratio)


def budget_left(unet: Any, fixed: Sequence[str], config: LearnConfig) -> float:
    """The ratio the mask learns among the candidates when `fixed` is frozen anyway and counts toward
    `config.ratio` (by `config.ratio_by`)."""
    from .guard import unet_tensors

    sizes = {n: t.numel() for n, t in unet_tensors(unet).items()}
    unknown = [n for n in fixed if n not in sizes]
    if unknown:
        raise ValueError(f"always_frozen: {len(unknown)} name(s) are not UNet tensors, e.g. {unknown[:3]}")
    weight = (lambda n: sizes[n]) if config.ratio_by == "params" else (lambda n: 1)
    total = sum(weight(n) for n in sizes)
    held = sum(weight(n) for n in set(fixed))
    left = (config.ratio * total - held) / (total - held) if total > held else 0.0
    if not 0.0 < left < 1.0:
        raise ValueError(f"always_frozen holds {held / total:.1%} of the UNet ({config.ratio_by}); the ratio "
                         f"{config.ratio} leaves the mask nothing to learn (it must exceed that share)")
    return left


def _run_identity(model: Any, illegal: Any, legal: Any, cfg: LearnConfig, warm_start_model: Any,
                  provenance: dict[str, Any] | None) -> dict[str, Any]:
    """What must be equal for a rerun into the same output directory to continue the earlier run."""
    from .configs import RESUMABLE_CHANGES
    from .guard import unet_tensors

    config = cfg.to_dict()
    for key in ("user", "warm_start"):
        config[key] = {k: v for k, v in config[key].items() if k not in RESUMABLE_CHANGES}
    warm = fingerprint_of(unet_tensors(warm_start_model.unet))["digest"] if warm_start_model is not None else None
    return {"config": config, "base": fingerprint_of(unet_tensors(model.unet))["digest"], "warm_start_model": warm,
            "illegal": canonical_digest(_manifest(illegal)), "legal": canonical_digest(_manifest(legal)),
            "provenance": provenance or {}}


def _learn_guard(model: Any, illegal: Any, legal: Any, config: LearnConfig | None = None, *,
                 output_dir: str | Path | None = None, warm_start_model: Any = None, accelerator: Any = None,
                 provenance: dict[str, Any] | None = None, always_frozen: Sequence[str] = (),
                 mask_ratio: float | None = None) -> Guard:
    from .guard import unet_tensors
    from .utils.plots import plot_guard, plot_learning

    cfg = config or LearnConfig()
    fixed = set(always_frozen)
    if fixed and mask_ratio is None:
        mask_ratio = budget_left(model.unet, sorted(fixed), cfg)
    mask_cfg = replace(cfg, ratio=mask_ratio) if fixed else cfg
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
    params = {f"unet.{n}": p for n, p in unet.named_parameters() if n not in fixed}
    warm = None
    if warm_start_model is not None:
        warm = {f"unet.{n}": t for n, t in unet_tensors(warm_start_model.unet).items() if n not in fixed}
    learner, metrics = learn_mask(objective, params, illegal_data, legal_data, mask_cfg, output_dir=output_dir,
                                  warm_start_params=warm, accelerator=accelerator)
    scores = {n.removeprefix("unet."): s for n, s in learner.scores().items()}
    candidates = {n: k for n, k in sizes.items() if n not in fixed}
    frozen = select_top(scores, candidates, mask_cfg.ratio, ratio_by=cfg.ratio_by) + sorted(fixed)
    if fixed:  # ranked above every candidate, as they were chosen first
        top = max(scores.values()) + 1.0
        scores.update({n: top for n in fixed})
    check = None
    if cfg.ranking_samples:
        check = ranking_check(learner.restore_effect(objective), [n.removeprefix("unet.") for n in learner.names],
                              set(frozen))
    prov = {
        "method": "freezeasguard (bilevel mask learning, first-order, alternating)",
        "config": cfg.to_dict(),
        "illegal": _manifest(illegal),
        "legal": _manifest(legal),
        "timing_seconds": {"warm_start": metrics["warm_start_seconds"], "learning": metrics["learning_seconds"]},
        **({"always_frozen": len(fixed), "mask_ratio": mask_cfg.ratio} if fixed else {}),
        "versions": _versions(),
        **(provenance or {}),
    }
    guard = Guard(frozen=tuple(sorted(frozen)), fingerprint=fingerprint, tensors={n: records[n] for n in sorted(frozen)},
                  method="learned", scores=scores, provenance=prov,
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())).with_text_encoders(model)
    if output_dir is not None:
        out = Path(output_dir)
        guard.save(out / "guard.json")
        atomic_write_json(out / "learn.json", {"config": cfg.to_dict(), "summary": guard.summary(),
                                               "history": learner.history, "ranking_check": check,
                                               "timing_seconds": prov["timing_seconds"],
                                               "user_step_time_s": metrics["learning"]["step_time_s"]})
        plot_guard(guard, out / "mask.png")
        plot_learning(learner.history, out / "learn.png", ratio_by=cfg.ratio_by)
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
