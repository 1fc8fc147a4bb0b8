"""Guard learning: the vectorised mask gradient, the theta(m) bookkeeping, exact ratios, ranking,
determinism and resume."""

from __future__ import annotations

import copy

import pytest
import torch

from freezeasguard.data import collate_examples
from freezeasguard.learn import (
    STREAM_RANKING,
    LearnConfig,
    MaskLearner,
    MixedData,
    learn_guard,
    learn_mask,
    mask_logit_gradient,
    project_to_ratio,
    ranking_check,
    soft_mask,
    temperature_at,
)
from freezeasguard.training import TrainCallback, TrainConfig, TrainContext


# ---------------------------------------------------------------------------- a constructed model
class Toy(torch.nn.Module):
    """Illegal samples are fitted by `ill1`/`ill2`, legal samples by `leg1`/`leg2`: the illegal loss depends
    only on the ill* tensors, the legal loss only on the leg* tensors."""

    def __init__(self, seed: int = 0, dtype=torch.float64, width: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name in ("ill1", "ill2", "leg1", "leg2"):
            layer = torch.nn.Linear(width, width).to(dtype)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(width, width, generator=g, dtype=dtype) * 0.1)
                layer.bias.zero_()
            setattr(self, name, layer)

    def forward(self, batch):
        x, y, domain = batch["x"], batch["y"], batch["domain"]
        ill = self.ill2(torch.tanh(self.ill1(x)))
        leg = self.leg2(torch.tanh(self.leg1(x)))
        pred = torch.where((domain == 0)[:, None], ill, leg)
        per_sample = ((pred - y) ** 2).mean(1)
        self.last_per_sample = per_sample.detach()
        w = batch.get("weights")
        return per_sample.mean() if w is None else (w.to(per_sample) * per_sample).sum()


class ToyData:
    def __init__(self, domain: int, n: int = 16, seed: int = 0, width: int = 4, dtype=torch.float64):
        g = torch.Generator().manual_seed(100 + seed + domain)
        self.x = torch.randn(n, width, generator=g, dtype=dtype)
        target = torch.randn(width, width, generator=g, dtype=dtype)
        self.y = torch.tanh(self.x @ target)
        self.domain = domain

    def __len__(self):
        return len(self.x)

    def example(self, i, seed):
        return {"x": self.x[i], "y": self.y[i], "domain": self.domain}

    collate = staticmethod(collate_examples)


def _toy_cfg(**kw):
    # by tensor count: these tests check the mechanism with every tensor weighted alike
    base = dict(ratio=0.5, ratio_by="count", mask_every=2, mask_steps=4, mask_batch=8, mask_lr=0.05,
                user=TrainConfig(batch_size=4, learning_rate=1e-2, progress=False, max_grad_norm=None),
                warm_start=TrainConfig(max_steps=30, batch_size=8, learning_rate=3e-2, progress=False),
                cache_encodings=False)
    base.update(kw)
    return LearnConfig(**base)


def _params(model):
    return dict(model.named_parameters())


# ---------------------------------------------------------------------------- the gradient
def test_vectorised_mask_gradient_equals_autograd_of_the_explicit_parameterisation():
    model = Toy()
    params = _params(model)
    names = list(params)
    theta_pre = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(1)
    theta_ft = {n: t + 0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in theta_pre.items()}
    x = torch.randn(len(names), generator=g, dtype=torch.float64) * 0.3
    T = 0.2
    ill, leg = ToyData(0), ToyData(1)
    examples = [ill.example(i, None) for i in range(4)] + [leg.example(i, None) for i in range(4)]
    batch = collate_examples(examples)
    batch["weights"] = torch.tensor([-0.5 / 4] * 4 + [0.5 / 4] * 4, dtype=torch.float64)

    # autograd through m * theta_pre + (1 - m) * theta_ft with respect to the logits
    xr = x.clone().requires_grad_(True)
    m = soft_mask(xr, T)
    explicit = {n: m[i] * theta_pre[n] + (1 - m[i]) * theta_ft[n] for i, n in enumerate(names)}
    loss = torch.func.functional_call(model, explicit, (batch,))
    (expected,) = torch.autograd.grad(loss, xr)

    # the learner's path: parameters hold theta(m), one backward, the vectorised formula
    m0 = soft_mask(x, T)
    with torch.no_grad():
        for i, n in enumerate(names):
            params[n].copy_(m0[i] * theta_pre[n] + (1 - m0[i]) * theta_ft[n])
    model.zero_grad()
    model(batch).backward()
    d = [theta_pre[n] - theta_ft[n] for n in names]
    got = mask_logit_gradient([params[n].grad for n in names], d, m0, T)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- bookkeeping
class RecordingData:
    """The learner's balanced mixed data, remembering the last batch it collated (the core collates a step's
    batch just before its forward pass)."""

    def __init__(self, illegal, legal):
        self.mixed = MixedData(illegal, legal)
        self.last = None

    def __len__(self):
        return len(self.mixed)

    def example(self, index, seed):
        return self.mixed.example(index, seed)

    def collate(self, items):
        self.last = self.mixed.collate(items)
        return self.last


class Reference(TrainCallback):
    """Runs beside the learner with its own explicit theta_pre, theta_ft and copy of the user's optimizer. The
    user's gradient (1 - m) g is computed here by autograd through m * theta_pre + (1 - m) * theta_ft, not copied
    from the learner; it is clipped by its global norm (the user clips the gradient of what the user trains,
    theta_ft) and stepped; then theta(m) must equal m * theta_pre + (1 - m) * theta_ft after every user and
    mask step."""

    name = "reference"

    def __init__(self, learner: MaskLearner, model, data: RecordingData, theta_pre, theta_ft, user_cfg):
        self.learner, self.model, self.data = learner, model, data
        self.pre = theta_pre
        self.ft = [t.clone().requires_grad_(True) for t in theta_ft]
        self.max_norm = user_cfg.max_grad_norm
        self.opt = torch.optim.AdamW(self.ft, lr=user_cfg.learning_rate, betas=(user_cfg.adam_beta1, user_cfg.adam_beta2),
                                     eps=user_cfg.adam_epsilon, weight_decay=user_cfg.weight_decay)
        self.checked = 0
        self.clipped = 0

    def _explicit(self):
        m = self.learner.m().double()
        return {n: m[i] * self.pre[i] + (1 - m[i]) * self.ft[i] for i, n in enumerate(self.learner.names)}

    def on_before_optimizer_step(self, ctx: TrainContext):
        # runs after the learner's hook: p holds theta_ft and its grad is the learner's (1 - m) g, not yet clipped
        for ref, p in zip(self.ft, self.learner.params):
            torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-10, atol=1e-10)
        with torch.enable_grad():
            loss = torch.func.functional_call(self.model, self._explicit(), (self.data.last,))
            grads = torch.autograd.grad(loss, self.ft)
        for ref, g, p in zip(self.ft, grads, self.learner.params):
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
            ref.grad = g
        norm = float(torch.nn.utils.clip_grad_norm_(self.ft, self.max_norm))
        self.clipped += norm > self.max_norm
        self.opt.step()

    def on_step_end(self, ctx: TrainContext):
        # after the user step and after any mask step the learner made in its own hook
        with torch.no_grad():
            explicit = self._explicit()
        for n, p in zip(self.learner.names, self.learner.params):
            torch.testing.assert_close(p.detach(), explicit[n], rtol=1e-10, atol=1e-10)
        self.checked += 1


@pytest.mark.parametrize("schedule", ["constant", "geometric"])
def test_theta_m_bookkeeping_and_the_clipped_user_gradient_match_an_independent_reference(schedule):
    model = Toy()
    params = _params(model)
    cfg = _toy_cfg(temperature_schedule=schedule)  # annealing moves theta(m) at every mask step too
    data = RecordingData(ToyData(0), ToyData(1))
    theta_pre = [p.detach().clone() for p in params.values()]
    g = torch.Generator().manual_seed(2)
    theta_ft = [t + 0.2 * torch.randn(t.shape, generator=g, dtype=t.dtype) for t in theta_pre]
    with torch.no_grad():
        for p, t in zip(params.values(), theta_ft):
            p.copy_(t)
    d = torch.cat([(a - b).reshape(-1) for a, b in zip(theta_pre, theta_ft)])
    learner = MaskLearner(params, data.mixed.illegal, data.mixed.legal, cfg, initial_d=d)
    # max_grad_norm small enough that clipping acts on most steps, so its order matters to the result
    user = TrainConfig(max_steps=cfg.mask_steps * cfg.mask_every, batch_size=2, learning_rate=1e-2, progress=False,
                       max_grad_norm=0.02)
    reference = Reference(learner, model, data, theta_pre, theta_ft, user)
    from freezeasguard.training import train

    train(model, data, params, user, callbacks=[learner, reference])
    assert reference.checked == user.max_steps and learner.mask_steps_done == cfg.mask_steps
    assert reference.clipped >= user.max_steps // 2
    # and theta_pre is recoverable from theta(m) and d alone: theta_pre = theta(m) + (1 - m) d
    m = learner.m().double()
    for i, (p, dv) in enumerate(zip(learner.params, learner.d_views)):
        torch.testing.assert_close(p.detach() + (1 - m[i]) * dv, theta_pre[i], rtol=1e-10, atol=1e-10)


def _bare(cfg, accelerator=None, *, model=None, logits=None, seed=3):
    """A learner outside the training loop, at theta(m) over a random theta_ft, and a context for mask_step."""
    from freezeasguard.training.core import make_accelerator

    model = model or Toy()
    params = _params(model)
    theta_pre = [p.detach().clone() for p in params.values()]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    d = torch.cat([(a - p.detach()).reshape(-1) for a, p in zip(theta_pre, params.values())])
    ill = ToyData(0, width=model.ill1.in_features, dtype=d.dtype)
    leg = ToyData(1, width=model.ill1.in_features, dtype=d.dtype)
    learner = MaskLearner(params, ill, leg, cfg, initial_d=d)
    if logits is not None:
        with torch.no_grad():
            learner.logits.copy_(logits)
    ctx = TrainContext(accelerator or make_accelerator(), model, model, None, params, TrainConfig(progress=False))
    learner.on_train_start(ctx)
    return model, params, learner, ctx


def _scaled_accelerator(scale):
    """accelerate's own Accelerator with a gradient scaler, as under fp16 on a GPU (on CPU accelerate has none):
    accelerator.backward(loss) then runs scaler.scale(loss).backward()."""
    from freezeasguard.training.core import make_accelerator

    acc = make_accelerator()
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    return acc


def test_mask_step_under_a_gradient_scaler_takes_the_unscaled_step():
    cfg = _toy_cfg(mask_optimizer="sgd", mask_lr=0.5)
    _, plain_params, plain, plain_ctx = _bare(cfg)
    _, params, scaled, ctx = _bare(cfg, _scaled_accelerator(2.0**12))
    start = plain.logits.detach().clone()
    plain.mask_step(plain_ctx)
    scaled.mask_step(ctx)
    assert (plain.logits.detach() - start).abs().max() > 1e-3  # the step is not vacuous
    torch.testing.assert_close(scaled.logits.detach(), plain.logits.detach(), rtol=1e-6, atol=1e-7)
    for a, b in zip(params.values(), plain_params.values()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)
    assert scaled.history[-1]["loss_scale"] == 2.0**12 and not scaled.history[-1]["skipped"]


def test_a_non_finite_mask_gradient_skips_the_step_and_is_logged():
    _, params, learner, ctx = _bare(_toy_cfg(), _scaled_accelerator(2.0**12))
    logits, d = learner.logits.detach().clone(), learner.d.clone()
    theta = [p.detach().clone() for p in params.values()]
    # an fp16 overflow in one tensor's gradient
    handle = params["ill1.weight"].register_hook(lambda g: g * float("inf"))
    learner.mask_step(ctx)
    handle.remove()
    assert torch.equal(learner.logits.detach(), logits) and torch.equal(learner.d, d)
    assert all(torch.equal(p.detach(), t) for p, t in zip(params.values(), theta))
    assert not learner.optimizer.state  # Adam's moments did not see the step either
    assert all(p.grad is None for p in params.values())
    entry = learner.history[-1]
    assert entry["skipped"] and learner.mask_steps_done == 1
    learner.mask_step(ctx)  # the next finite step goes ahead
    assert not learner.history[-1]["skipped"] and not torch.equal(learner.logits.detach(), logits)


class Recording(Toy):
    """Remembers the domain of every sample of every batch it is run on."""

    def __init__(self):
        super().__init__()
        self.domains = []

    def forward(self, batch):
        self.domains.append(batch["domain"].tolist())
        return super().forward(batch)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_every_batch_of_a_learning_run_is_half_illegal_half_legal(accumulation):
    model = Recording()
    cfg = _toy_cfg(user=TrainConfig(batch_size=4, gradient_accumulation=accumulation, learning_rate=1e-2, progress=False),
                   warm_start=TrainConfig(max_steps=5, batch_size=6, learning_rate=1e-2, progress=False))
    learn_mask(model, _params(model), ToyData(0, n=16), ToyData(1, n=10), cfg)
    sizes = [len(d) for d in model.domains]
    user_steps = cfg.mask_steps * cfg.mask_every
    assert sizes.count(6) == 5 and sizes.count(8) == cfg.mask_steps and sizes.count(4) == user_steps * accumulation
    assert len(sizes) == 5 + cfg.mask_steps + user_steps * accumulation
    for domains in model.domains:
        assert domains.count(0) == domains.count(1), domains
    with pytest.raises(ValueError, match="even"):
        LearnConfig(user=TrainConfig(batch_size=3))


def test_mixed_data_draws_are_a_function_of_seed_and_sample():
    mixed = MixedData(ToyData(0, n=5), ToyData(1, n=3))
    assert len(mixed) == 5
    a, b = mixed.example(4, 123), mixed.example(4, 123)
    assert [e["seeds"] for e in a["pair"]] == [e["seeds"] for e in b["pair"]]
    assert len({e["seeds"] for e in a["pair"]} | {123}) == 3  # each half has its own seed
    batch = mixed.collate([mixed.example(i, i) for i in range(4)])
    assert batch["domain"].tolist() == [0] * 4 + [1] * 4
    torch.testing.assert_close(batch["x"][7], ToyData(1, n=3).x[3 % 3])


def test_the_mask_step_allocates_no_model_size_buffer_beyond_the_gradient():
    from freezeasguard.training.allocations import AllocationPeak

    # wide layers and a small batch: the parameters dominate, activations are negligible
    model = Toy(dtype=torch.float32, width=128)
    model, params, learner, ctx = _bare(_toy_cfg(mask_batch=4), model=model)
    model_bytes = sum(p.numel() * p.element_size() for p in params.values())
    with AllocationPeak() as alloc:
        learner.mask_step(ctx)
    # the gradients of the one backward pass (1x) and activations; no concatenated copies, no products with d
    assert model_bytes <= alloc.peak < 1.2 * model_bytes, (alloc.peak, model_bytes)
    grads = [torch.randn_like(p) for p in params.values()]
    with AllocationPeak() as alloc:
        mask_logit_gradient(grads, learner.d_views, learner.m(), 0.2)
    assert alloc.peak < 0.01 * model_bytes


# ---------------------------------------------------------------------------- ratio and ranking
@pytest.mark.parametrize("weights", [None, torch.tensor([1.0, 10.0, 100.0, 5.0, 7.0])])
def test_projection_hits_the_ratio(weights):
    x = torch.tensor([0.3, -0.2, 1.0, 0.05, -2.0])
    y = project_to_ratio(x, 0.37, 0.2, weights)
    m = soft_mask(y, 0.2)
    w = torch.ones(5) if weights is None else weights
    assert abs(float((m * w).sum() / w.sum()) - 0.37) < 1e-6
    assert torch.equal(torch.argsort(y), torch.argsort(x))  # a shift keeps the order


@pytest.mark.parametrize("seed", [0, 1])
def test_the_learner_freezes_the_illegal_tensors_first(seed):
    """The weights carry the domains (the biases start at 0 and carry nearly nothing, so their order is noise
    and is not asserted): both illegal weight tensors must come first. All logits start equal, so the order is
    learned; a random order passes the first assertion with probability 1/28."""
    model = Toy(seed=seed)
    params = _params(model)
    learner, _ = learn_mask(model, params, ToyData(0, seed=seed), ToyData(1, seed=seed),
                            _toy_cfg(mask_steps=10, seed=seed))
    scores = learner.scores()
    top = sorted(scores, key=scores.get, reverse=True)[:2]
    assert set(top) == {"ill1.weight", "ill2.weight"}, scores
    # the data term decided: every illegal weight's logit rose above every legal weight's, while the ratio held
    assert min(scores["ill1.weight"], scores["ill2.weight"]) > max(scores["leg1.weight"], scores["leg2.weight"]) + 0.3
    assert abs(float(learner.m().mean()) - 0.5) < 1e-6
    assert learner.history and all(abs(h["soft_ratio"] - 0.5) < 1e-5 for h in learner.history)


def _explicit_upper_loss(model, learner, batch, x):
    """The upper-level loss as a function of the logits, through m * theta_pre + (1 - m) * theta_ft, built
    from the learner's theta(m) and d only at the start (theta_pre = p + (1 - m) d, theta_ft = p - m d)."""
    m0 = learner.m().double()
    pre = [p.detach() + (1 - m0[i]) * dv for i, (p, dv) in enumerate(zip(learner.params, learner.d_views))]
    ft = [p.detach() - m0[i] * dv for i, (p, dv) in enumerate(zip(learner.params, learner.d_views))]
    m = soft_mask(x, learner.temperature)
    explicit = {n: m[i] * pre[i] + (1 - m[i]) * ft[i] for i, n in enumerate(learner.names)}
    return torch.func.functional_call(model, explicit, (batch,)), m, pre, ft


@pytest.mark.parametrize("ratio_by", ["count", "params"])
def test_penalty_mode_takes_the_authors_sgd_step(ratio_by):
    """The authors' update: SGD on the logits of data term + c (rho - mean m)^2, checked against autograd."""
    lr, c, rho = 0.3, 40.0, 0.3
    cfg = _toy_cfg(ratio_control="penalty", mask_optimizer="sgd", mask_lr=lr, penalty=c, ratio=rho,
                   ratio_by=ratio_by)
    start = torch.tensor([0.3, -0.1, 0.25, 0.0, -0.2, 0.1, 0.05, -0.3])  # mean m far from rho: the penalty acts
    model, params, learner, ctx = _bare(cfg, logits=start)
    batch = learner._mask_batch(ctx)  # what the step will draw (a function of the seed and the step)
    x = start.double().requires_grad_(True)
    data, m, pre, ft = _explicit_upper_loss(model, learner, batch, x)
    w = torch.tensor([float(p.numel()) for p in params.values()], dtype=torch.float64)
    w = w if ratio_by == "params" else torch.ones_like(w)
    penalty = c * (rho - (m * w).sum() / w.sum()) ** 2
    (g_data,) = torch.autograd.grad(data, x, retain_graph=True)
    (g_pen,) = torch.autograd.grad(penalty, x)
    assert g_pen.norm() > 0.5 * g_data.norm() > 0  # both terms matter to the step checked here
    learner.mask_step(ctx)
    expected = start.double() - lr * (g_data + g_pen)
    torch.testing.assert_close(learner.logits.detach().double(), expected, rtol=1e-6, atol=1e-7)
    m_new = learner.m().double()
    for i, p in enumerate(params.values()):  # theta(m) followed the new mask
        torch.testing.assert_close(p.detach(), m_new[i] * pre[i] + (1 - m_new[i]) * ft[i], rtol=1e-10, atol=1e-12)


def test_logged_ratios_give_both_shares_and_follow_the_parameter_weighting():
    model = Toy()
    params = _params(model)
    learner, _ = learn_mask(model, params, ToyData(0), ToyData(1), _toy_cfg(ratio=0.4, ratio_by="params"))
    sizes = torch.tensor([float(p.numel()) for p in params.values()], dtype=torch.float64)
    for h in learner.history:
        assert abs(h["soft_ratio"] - 0.4) < 1e-6 and h["soft_ratio"] == h["soft_ratio_params"]
        assert h["hard_ratio"] == h["hard_ratio_params"]
    last, m = learner.history[-1], learner.m().double()
    hard = (m > 0.5).double()
    assert last["soft_ratio_tensors"] == pytest.approx(float(m.mean()), abs=1e-12)
    assert last["hard_ratio_tensors"] == pytest.approx(float(hard.mean()), abs=1e-12)
    assert last["hard_ratio_params"] == pytest.approx(float((hard * sizes).sum() / sizes.sum()), abs=1e-12)
    # the two shares differ on this model (16- and 4-element tensors), so the test tells them apart
    assert abs(last["soft_ratio_tensors"] - 0.4) > 1e-3


# ---------------------------------------------------------------------------- learner options beyond the paper
def test_sgd_normalised_steps_are_the_autograd_gradient_over_one_fixed_scale():
    lr = 0.05
    model, params, learner, ctx = _bare(_toy_cfg(mask_optimizer="sgd-normalised", mask_lr=lr))
    rms = []
    for _ in range(3):
        x = learner.logits.detach().double().clone()
        xr = x.clone().requires_grad_(True)
        loss, *_ = _explicit_upper_loss(model, learner, learner._mask_batch(ctx), xr)
        (g,) = torch.autograd.grad(loss, xr)
        rms.append(float(g.pow(2).mean().sqrt()))
        learner.mask_step(ctx)
        residual = learner.logits.detach().double() - x + lr * g / rms[0]
        # the step is -lr g / (first step's RMS); the projection then adds one constant to every logit
        assert float(residual.max() - residual.min()) < 1e-6, residual
        assert learner.grad_scale == pytest.approx(rms[0], rel=1e-6)
    assert abs(rms[2] / rms[0] - 1) > 0.05  # the gradient's scale changed, so a per-step rescale would differ


class Scripted(torch.nn.Module):
    """A constructed model: four scalar tensors; at its j-th call the loss is sum_i c_i(j) theta_i, so with d = 1
    the mask gradient of tensor i is c_i(j) m_i (1 - m_i) / T. The `big` tensors have large gradients whose sign
    flips every third step; the `steady` ones tiny gradients of constant sign. Freezing a big tensor lowers the
    upper loss by about 100x more in total (sum over steps of -c_i): they are the decisive ones."""

    names = ("big1", "big2", "steady1", "steady2")

    def __init__(self):
        super().__init__()
        for name in self.names:
            setattr(self, name, torch.nn.Parameter(torch.zeros(1, dtype=torch.float64)))
        self.calls = 0

    def coefficients(self, j):
        flip = -0.6 if j % 3 == 2 else 1.0
        return [-10.0 * flip, -8.0 * flip, -0.05, -0.04]

    def forward(self, batch):
        c = self.coefficients(self.calls)
        self.calls += 1
        return sum(ci * getattr(self, n).sum() for ci, n in zip(c, self.names))


def test_the_magnitude_aware_learner_ranks_the_decisive_tensors_first_where_adam_does_not():
    steps = 30
    decisive = sorted(Scripted.names, key=lambda n: sum(Scripted().coefficients(j)[Scripted.names.index(n)]
                                                         for j in range(steps)))[:2]
    assert set(decisive) == {"big1", "big2"}
    top = {}
    for optimizer in ("adam", "sgd-normalised"):
        model = Scripted()
        cfg = _toy_cfg(ratio=0.5, mask_optimizer=optimizer, mask_lr=0.05, mask_steps=steps)
        learner = MaskLearner(_params(model), ToyData(0), ToyData(1), cfg, initial_d=torch.ones(4, dtype=torch.float64))
        from freezeasguard.training.core import make_accelerator

        ctx = TrainContext(make_accelerator(), model, model, None, _params(model), TrainConfig(progress=False))
        learner.on_train_start(ctx)
        for _ in range(steps):
            learner.mask_step(ctx)
        scores = learner.scores()
        top[optimizer] = set(sorted(scores, key=scores.get, reverse=True)[:2])
    # Adam moves every logit by about mask_lr per step and rewards the steady sign; SGD on one scale moves
    # logits in proportion to what freezing them is worth
    assert top["sgd-normalised"] == set(decisive)
    assert top["adam"] == {"steady1", "steady2"}


@pytest.mark.parametrize("schedule", ["linear", "geometric"])
def test_annealing_polarises_while_the_projection_keeps_the_exact_weighted_ratio(schedule):
    runs = {}
    for sched in ("constant", schedule):
        model = Toy()
        params = _params(model)
        cfg = _toy_cfg(ratio=0.4, ratio_by="params", mask_steps=6, temperature_schedule=sched,
                       temperature_final=0.005)
        learner, _ = learn_mask(model, params, ToyData(0), ToyData(1), cfg)
        runs[sched] = (cfg, learner)
    cfg, learner = runs[schedule]
    temps = [h["temperature"] for h in learner.history]
    assert temps == pytest.approx([temperature_at(cfg, j + 1) for j in range(6)], rel=1e-12)
    assert temps[-1] == pytest.approx(0.005) and all(a > b for a, b in zip(temps, temps[1:]))
    sizes = torch.tensor([float(p.numel()) for p in learner.params], dtype=torch.float64)
    for h in learner.history:
        assert abs(h["soft_ratio_params"] - 0.4) < 1e-6  # exact at every T
        assert 0 <= h["polarisation_tensors"] <= 1 and h["polarisation"] == h["polarisation_params"]
    m = learner.m().double()
    polarised = ((m < 0.05) | (m > 0.95)).double()
    last = learner.history[-1]
    assert last["polarisation_tensors"] == pytest.approx(float(polarised.mean()), abs=1e-12)
    assert last["polarisation_params"] == pytest.approx(float((polarised * sizes).sum() / sizes.sum()), abs=1e-12)
    constant = runs["constant"][1].history[-1]
    assert last["polarisation_tensors"] >= 0.75 > constant["polarisation_tensors"]
    # the order of the logits is what the guard keeps; a temperature does not reorder it
    assert (float((m * sizes).sum() / sizes.sum()) - 0.4) < 1e-6


def test_restore_effect_is_the_first_order_change_of_restoring_tensors():
    model, params, learner, ctx = _bare(_toy_cfg(ranking_samples=6))
    names = list(params)
    theta_m = [p.detach().clone() for p in params.values()]
    effect = learner.restore_effect(model)
    for p, t in zip(params.values(), theta_m):  # back at theta(m)
        torch.testing.assert_close(p.detach(), t, rtol=0, atol=1e-15)
    assert all(p.grad is None for p in params.values())
    m = learner.m().double()
    ft = {n: theta_m[i] - m[i] * learner.d_views[i] for i, n in enumerate(names)}
    d = dict(zip(names, learner.d_views))
    frozen = {"ill1.weight", "ill2.bias", "leg1.weight"}
    for side, domain in ((0, "illegal"), (1, "legal")):
        batch = collate_examples(learner._draw(side, range(6), STREAM_RANKING))

        def loss(t, subset, batch=batch):
            moved = {n: ft[n] + t * d[n] if n in subset else ft[n] for n in names}
            return float(torch.func.functional_call(model, moved, (batch,)))

        for subset in [{n} for n in names] + [frozen, set(names)]:
            brute = (loss(1e-4, subset) - loss(-1e-4, subset)) / 2e-4  # brute force: restore a bit of d
            predicted = sum(v for n, v in zip(names, effect[domain]) if n in subset)
            assert predicted == pytest.approx(brute, rel=1e-6, abs=1e-12), (domain, subset)
        # the toy's illegal loss does not depend on the leg* tensors, nor the legal loss on the ill* ones
        other = "leg" if domain == "illegal" else "ill"
        assert all(v == 0 for n, v in zip(names, effect[domain]) if n.startswith(other))
    summary = ranking_check(effect, names, frozen)
    assert summary["illegal"]["frozen"] == pytest.approx(sum(v for n, v in zip(names, effect["illegal"]) if n in frozen))
    assert summary["legal"]["all"] == pytest.approx(sum(effect["legal"]))
    assert [t["tensor"] for t in summary["top_frozen"]] == sorted(
        frozen, key=lambda n: -effect["illegal"][names.index(n)])


def _crash_at(step):
    """Patch learn.train so the guard-learning run raises after `step` user steps (its checkpoint is then the
    last one written); returns the undo function."""
    from freezeasguard import learn as learn_module

    class Crash(TrainCallback):
        name = "crash"

        def on_step_end(self, ctx):
            if ctx.step == step:
                raise RuntimeError("crash")

    real_train = learn_module.train

    def crashing_train(*args, **kwargs):
        if kwargs.get("desc") == "learn guard":
            kwargs["callbacks"] = list(kwargs["callbacks"]) + [Crash()]
        return real_train(*args, **kwargs)

    learn_module.train = crashing_train
    return lambda: setattr(learn_module, "train", real_train)


def test_the_levers_state_resumes_bit_identically(tmp_path):
    """sgd-normalised's fixed scale and the annealed temperature are checkpointed with the logits."""
    cfg = _toy_cfg(mask_optimizer="sgd-normalised", temperature_schedule="geometric", mask_steps=6,
                   user=TrainConfig(batch_size=4, learning_rate=1e-2, progress=False, checkpoint_every=4))
    model = Toy()
    straight, _ = learn_mask(model, _params(model), ToyData(0), ToyData(1), cfg)
    undo = _crash_at(7)
    try:
        with pytest.raises(RuntimeError, match="crash"):
            model = Toy()
            learn_mask(model, _params(model), ToyData(0), ToyData(1), cfg, output_dir=tmp_path)
    finally:
        undo()
    model = Toy()
    resumed, _ = learn_mask(model, _params(model), ToyData(0), ToyData(1), cfg, output_dir=tmp_path)
    assert torch.equal(resumed.logits, straight.logits) and resumed.grad_scale == straight.grad_scale
    assert resumed.temperature == straight.temperature == pytest.approx(cfg.temperature_final)
    assert resumed.history == straight.history


# ---------------------------------------------------------------------------- the diffusion path
def _guard_cfg(**kw):
    base = dict(ratio=0.3, ratio_by="count", mask_every=2, mask_steps=3, mask_batch=4, mask_lr=0.05,
                user=TrainConfig(batch_size=2, learning_rate=1e-3, progress=False, checkpoint_every=2),
                warm_start=TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-3, progress=False))
    base.update(kw)
    return LearnConfig(**base)


def _tiny():
    from freezeasguard.tiny import TinySpec, build_tiny_model

    return build_tiny_model(TinySpec(), seed=0)


def test_learned_guard_is_exact_deterministic_and_resumable(toy_data, tmp_path):
    ill, leg = toy_data(6), toy_data(6, random_flip=False)
    first = learn_guard(_tiny(), ill, leg, _guard_cfg(), output_dir=tmp_path / "a")
    n = len(first.names)
    assert len(first.frozen) == round(0.3 * n) and first.method == "learned"
    assert set(first.scores) == set(first.names)
    assert (tmp_path / "a" / "guard.json").is_file() and (tmp_path / "a" / "mask.png").is_file()
    import json as _json

    from PIL import Image

    report = _json.loads((tmp_path / "a" / "learn.json").read_text())
    assert len(report["history"]) == 3 and {"polarisation_tensors", "hard_ratio_params", "temperature"} <= set(report["history"][0])
    check = report["ranking_check"]
    frozen_share = check["illegal"]["frozen_share_of_all"]
    assert frozen_share is not None and abs(frozen_share - check["illegal"]["frozen"] / check["illegal"]["all"]) < 1e-12
    assert {t["tensor"] for t in check["top_frozen"]} <= set(first.frozen)
    assert Image.open(tmp_path / "a" / "learn.png").size[0] > 100
    again = learn_guard(_tiny(), ill, leg, _guard_cfg())
    assert again.frozen == first.frozen and again.scores == first.scores

    undo = _crash_at(5)
    try:
        with pytest.raises(RuntimeError, match="crash"):
            learn_guard(_tiny(), ill, leg, _guard_cfg(), output_dir=tmp_path / "b")
    finally:
        undo()
    resumed = learn_guard(_tiny(), ill, leg, _guard_cfg(), output_dir=tmp_path / "b")
    assert resumed.frozen == first.frozen and resumed.scores == first.scores


def test_ratio_by_parameter_budget(toy_data):
    guard = learn_guard(_tiny(), toy_data(4), toy_data(4), _guard_cfg(ratio_by="params", ratio=0.4))
    sizes = {n: guard.numel(n) for n in guard.names}
    assert guard.ratio_by_params <= 0.4
    left = sorted((n for n in guard.names if n not in guard.frozen), key=lambda n: -guard.scores[n])
    assert sum(sizes[n] for n in guard.frozen) + sizes[left[0]] > 0.4 * sum(sizes.values())


def test_config_options_are_validated():
    with pytest.raises(ValueError, match="ratio"):
        LearnConfig(ratio=1.5)
    with pytest.raises(ValueError, match="mask_optimizer"):
        LearnConfig(mask_optimizer="lion")
    with pytest.raises(ValueError, match="temperature_schedule"):
        LearnConfig(temperature_schedule="cosine")
    with pytest.raises(ValueError, match="temperature_final"):
        LearnConfig(temperature_final=0.0)
    with pytest.raises(ValueError, match="unknown LearnConfig"):
        LearnConfig.from_dict({"ratios": 0.3})
    cfg = LearnConfig.from_dict(copy.deepcopy(LearnConfig().to_dict()))
    assert cfg == LearnConfig()


def test_cli_learn_from_image_folders(tmp_path):
    import json as _json

    from typer.testing import CliRunner

    from conftest import CAPTIONS, toy_images
    from freezeasguard.cli import app
    from freezeasguard.data import write_imagefolder
    from freezeasguard.tiny import TinySpec, write_tiny_model

    base = write_tiny_model(tmp_path / "base", TinySpec())
    ill = write_imagefolder(tmp_path / "ill", toy_images(4, 16), [CAPTIONS[0]] * 4)
    leg = write_imagefolder(tmp_path / "leg", toy_images(4, 16, seed=1), [CAPTIONS[1]] * 4)
    cfg = tmp_path / "learn.json"
    cfg.write_text(_json.dumps({"mask_every": 1, "mask_steps": 2, "mask_batch": 2,
                                "user": {"batch_size": 2, "progress": False},
                                "warm_start": {"max_steps": 1, "batch_size": 2, "progress": False}}))
    result = CliRunner().invoke(app, ["learn", "--model", str(base), "--illegal", str(ill), "--legal", str(leg),
                                      "--ratio", "0.25", "--config", str(cfg), "--out", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    from freezeasguard.guard import Guard

    g = Guard.load(tmp_path / "g" / "guard.json")
    # the CLI's default freeze ratio is a parameter budget (the same in every command)
    assert g.provenance["config"]["ratio_by"] == "params" and g.method == "learned"
    assert 0.2 < g.ratio_by_params <= 0.25
    assert g.provenance["illegal"]["items"] == 4
    bad = CliRunner().invoke(app, ["learn", "--model", str(base), "--illegal", str(ill), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--legal" in bad.output
