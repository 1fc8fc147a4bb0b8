"""Guard learning: the vectorised mask gradient, the theta(m) bookkeeping, exact ratios, ranking,
determinism and resume."""

from __future__ import annotations

import copy

import pytest
import torch

from freezeasguard.data import collate_examples
from freezeasguard.learn import (
    LearnConfig,
    MaskLearner,
    MixedData,
    learn_guard,
    learn_mask,
    mask_logit_gradient,
    project_to_ratio,
    soft_mask,
)
from freezeasguard.training import TrainCallback, TrainConfig, TrainContext


# ---------------------------------------------------------------------------- a constructed model
class Toy(torch.nn.Module):
    """Illegal samples are fitted by `ill1`/`ill2`, legal samples by `leg1`/`leg2`: the illegal loss depends
    only on the ill* tensors, the legal loss only on the leg* tensors."""

    def __init__(self, seed: int = 0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name in ("ill1", "ill2", "leg1", "leg2"):
            layer = torch.nn.Linear(4, 4).to(dtype)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(4, 4, generator=g, dtype=dtype) * 0.1)
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
    def __init__(self, domain: int, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(100 + seed + domain)
        self.x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        target = torch.randn(4, 4, generator=g, dtype=torch.float64)
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
    d = torch.cat([(theta_pre[n] - theta_ft[n]).reshape(-1) for n in names])
    lengths = torch.tensor([params[n].numel() for n in names])
    got = mask_logit_gradient([params[n].grad for n in names], d, lengths, m0, T)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- bookkeeping
class Reference(TrainCallback):
    """Runs beside the learner and tracks theta_ft explicitly with its own copy of the user's optimizer, to
    check that theta(m) == m * theta_pre + (1 - m) * theta_ft after every user and mask step."""

    name = "reference"

    def __init__(self, learner: MaskLearner, theta_pre, theta_ft, user_cfg):
        self.learner = learner
        self.pre = theta_pre
        self.ft = [t.clone().requires_grad_(True) for t in theta_ft]
        self.opt = torch.optim.AdamW(self.ft, lr=user_cfg.learning_rate, betas=(user_cfg.adam_beta1, user_cfg.adam_beta2),
                                     eps=user_cfg.adam_epsilon, weight_decay=user_cfg.weight_decay)
        self.checked = 0

    def _check(self):
        m = self.learner.m().double()
        for i, p in enumerate(self.learner.params):
            expected = m[i] * self.pre[i] + (1 - m[i]) * self.ft[i].detach()
            torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-10)
        self.checked += 1

    def on_before_optimizer_step(self, ctx: TrainContext):
        # runs after the learner's hook: p holds theta_ft and its grad is already (1 - m) g
        for ref, p in zip(self.ft, self.learner.params):
            torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-10, atol=1e-10)
            ref.grad = p.grad.detach().clone()
        self.opt.step()

    def on_step_end(self, ctx: TrainContext):
        self._check()  # after the user step and after any mask step the learner made in its own hook


def test_theta_m_bookkeeping_matches_an_explicit_three_copy_reference():
    model = Toy()
    params = _params(model)
    names = list(params)
    cfg = _toy_cfg()
    ill, leg = ToyData(0), ToyData(1)
    theta_pre = [p.detach().clone() for p in params.values()]
    g = torch.Generator().manual_seed(2)
    theta_ft = [t + 0.2 * torch.randn(t.shape, generator=g, dtype=t.dtype) for t in theta_pre]
    with torch.no_grad():
        for p, t in zip(params.values(), theta_ft):
            p.copy_(t)
    d = torch.cat([(a - b).reshape(-1) for a, b in zip(theta_pre, theta_ft)])
    learner = MaskLearner(params, ill, leg, cfg, initial_d=d)
    user = TrainConfig(max_steps=cfg.mask_steps * cfg.mask_every, batch_size=4, learning_rate=1e-2, progress=False,
                       max_grad_norm=None)
    reference = Reference(learner, theta_pre, theta_ft, user)
    from freezeasguard.training import train

    train(model, MixedData(ill, leg), params, user, callbacks=[learner, reference])
    assert reference.checked == user.max_steps and learner.mask_steps_done == cfg.mask_steps
    # and theta_pre is recoverable from theta(m) and d alone: theta_pre = theta(m) + (1 - m) d
    m = learner.m().double()
    for i, (p, dv) in enumerate(zip(learner.params, learner.d_views)):
        torch.testing.assert_close(p.detach() + (1 - m[i]) * dv, theta_pre[i], rtol=1e-10, atol=1e-10)
    assert len(names) == 8


# ---------------------------------------------------------------------------- ratio and ranking
@pytest.mark.parametrize("weights", [None, torch.tensor([1.0, 10.0, 100.0, 5.0, 7.0])])
def test_projection_hits_the_ratio(weights):
    x = torch.tensor([0.3, -0.2, 1.0, 0.05, -2.0])
    y = project_to_ratio(x, 0.37, 0.2, weights)
    m = soft_mask(y, 0.2)
    w = torch.ones(5) if weights is None else weights
    assert abs(float((m * w).sum() / w.sum()) - 0.37) < 1e-6
    assert torch.equal(torch.argsort(y), torch.argsort(x))  # a shift keeps the order


def test_the_learner_freezes_the_illegal_tensors_first():
    model = Toy()
    params = _params(model)
    learner, _ = learn_mask(model, params, ToyData(0), ToyData(1), _toy_cfg(mask_steps=10))
    scores = learner.scores()
    top = sorted(scores, key=scores.get, reverse=True)[:4]
    assert set(top) == {n for n in scores if n.startswith("ill")}, scores
    # the data term decided: every illegal logit rose above every legal one, while the ratio held
    assert min(scores[n] for n in top) > max(s for n, s in scores.items() if n not in top)
    assert abs(float(learner.m().mean()) - 0.5) < 1e-6
    assert learner.history and all(abs(h["soft_ratio"] - 0.5) < 1e-5 for h in learner.history)


def test_a_random_mask_fails_the_ranking_test():
    """The ranking test is not vacuous: random scores put exactly the illegal tensors on top in 1 of 70 draws."""
    names = ["ill1.weight", "ill1.bias", "ill2.weight", "ill2.bias", "leg1.weight", "leg1.bias", "leg2.weight", "leg2.bias"]
    hits = 0
    for seed in range(200):
        r = torch.rand(8, generator=torch.Generator().manual_seed(seed))
        top = {names[i] for i in torch.argsort(r, descending=True)[:4].tolist()}
        hits += top == set(names[:4])
    assert hits < 10


def test_authors_penalty_is_available_and_only_approximates_the_ratio():
    model = Toy()
    learner, _ = learn_mask(model, _params(model), ToyData(0), ToyData(1),
                            _toy_cfg(ratio_control="penalty", mask_optimizer="sgd", mask_lr=10.0, penalty=5e3))
    assert learner.history  # runs; the ratio is whatever the penalty lets it be
    assert all(0 <= h["soft_ratio"] <= 1 for h in learner.history)


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
    again = learn_guard(_tiny(), ill, leg, _guard_cfg())
    assert again.frozen == first.frozen and again.scores == first.scores

    class Crash(TrainCallback):
        name = "crash"

        def on_step_end(self, ctx):
            if ctx.step == 5:
                raise RuntimeError("crash")

    from freezeasguard import learn as learn_module

    real_train = learn_module.train

    def crashing_train(*args, **kwargs):
        if kwargs.get("desc") == "learn guard":
            kwargs["callbacks"] = list(kwargs["callbacks"]) + [Crash()]
        return real_train(*args, **kwargs)

    learn_module.train = crashing_train
    try:
        with pytest.raises(RuntimeError, match="crash"):
            learn_guard(_tiny(), ill, leg, _guard_cfg(), output_dir=tmp_path / "b")
    finally:
        learn_module.train = real_train
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
