"""Metrics on inputs with known answers, and every baseline behind the registry on a tiny model."""

from __future__ import annotations

import pytest
import torch

from freezeasguard.bench.evaluate import bootstrap_ci, frechet_distance, recognise
from freezeasguard.bench.recogniser import Recogniser, RecogniserConfig
from freezeasguard.learn import LearnConfig
from freezeasguard.protections import PROTECTIONS, ReleaseContext, protect
from freezeasguard.protections.uce import uce_closed_form
from freezeasguard.tiny import TinySpec, build_tiny_model
from freezeasguard.training import TrainConfig


def _rec(identities=("a", "b", "c")):
    torch.manual_seed(0)
    return Recogniser(RecogniserConfig(identities=list(identities), resolution=16))


def test_frechet_distance_of_identical_sets_is_about_zero_and_grows_with_a_shift():
    rec = _rec()
    g = torch.Generator().manual_seed(0)
    real = torch.rand(64, 3, 16, 16, generator=g)
    same = frechet_distance(rec, real, real.clone())
    assert abs(same) < 1e-3
    other = frechet_distance(rec, real, (real * 0.5 + 0.5).clamp(0, 1))
    assert other > same + 1e-3


def test_a_perfect_recogniser_scores_one_and_a_wrong_one_zero(monkeypatch):
    rec = _rec()
    images = torch.rand(6, 3, 16, 16)
    targets = ["a", "b", "c", "a", "b", "c"]
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()
    monkeypatch.setattr(rec, "predict", lambda x, batch_size=256: {"identity": onehot, "style": onehot[:, :2],
                                                                   "features": torch.zeros(6, 4)})
    r = recognise(rec, images, targets)
    assert r["rate"] == 1.0 and r["mean_prob"] == 1.0
    r = recognise(rec, images, ["b", "c", "a", "b", "c", "a"])
    assert r["rate"] == 0.0
    with pytest.raises(ValueError, match="no identity class"):
        recognise(rec, images, ["zzz"] * 6)


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n():
    small = torch.tensor([1.0, 0.0] * 10)
    large = torch.tensor([1.0, 0.0] * 500)
    lo, hi = bootstrap_ci(small, seed=1)
    assert lo < 0.5 < hi
    lo2, hi2 = bootstrap_ci(large, seed=1)
    assert lo2 < 0.5 < hi2 and (hi2 - lo2) < (hi - lo)
    assert bootstrap_ci(small, seed=1) == bootstrap_ci(small, seed=1)


def test_uce_closed_form_matches_a_least_squares_solve():
    g = torch.Generator().manual_seed(0)
    d, out, n, m, lam, eps = 6, 5, 4, 7, 0.7, 1e-3
    W = torch.randn(out, d, generator=g, dtype=torch.float64)
    E = torch.randn(n, d, generator=g, dtype=torch.float64)
    G = torch.randn(n, d, generator=g, dtype=torch.float64)
    P = torch.randn(m, d, generator=g, dtype=torch.float64)
    got = uce_closed_form(W, E, G, P, lam, eps)
    # stack the three terms as one least-squares problem over W'^T: A W'^T = B
    A = torch.cat([E, lam ** 0.5 * P, eps ** 0.5 * torch.eye(d, dtype=torch.float64)])
    B = torch.cat([G @ W.T, lam ** 0.5 * P @ W.T, eps ** 0.5 * W.T])
    expected = torch.linalg.lstsq(A, B).solution.T
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    # with no edit rows, UCE changes nothing
    torch.testing.assert_close(uce_closed_form(W, E[:0], G[:0], P, lam, eps), W, rtol=1e-8, atol=1e-10)


@pytest.fixture
def ctx_factory(toy_data):
    def make(ratio=0.3):
        model = build_tiny_model(TinySpec(), seed=0)
        learn = LearnConfig(mask_every=2, mask_steps=2, mask_batch=4,
                            user=TrainConfig(batch_size=2, progress=False),
                            warm_start=TrainConfig(max_steps=2, batch_size=2, progress=False))
        prompts = {"uce_edit": ["a red cat", "a green dog"], "uce_guide": ["a red house", "a green tree"],
                   "uce_preserve": ["a blue tree", "a yellow house"]}
        ctx = ReleaseContext(model, toy_data(4), toy_data(4, random_flip=False), ratio, seed=0, ratio_by="count",
                             prompts=prompts)
        ctx.options = {"guard": learn, "importance-change": {"warm_start": learn.warm_start}, "imma": {"steps": 2}}
        return ctx

    return make


@pytest.mark.parametrize("name", ["random", "importance-change", "importance-grad", "importance-ratio", "guard"])
def test_guard_baselines_hit_the_ratio(name, ctx_factory):
    ctx = ctx_factory(0.3)
    before = {n: p.detach().clone() for n, p in ctx.model.unet.named_parameters()}
    out = protect(name, ctx, ctx.options)
    n = len(before)
    assert out.guard is not None and len(out.guard.frozen) == round(0.3 * n)
    out.guard.check_fingerprint(out.model.unet)
    # guard-only methods release the base unchanged
    assert all(torch.equal(before[k], p) for k, p in out.model.unet.named_parameters())


def test_uce_edits_exactly_the_cross_attention_key_value_projections(ctx_factory):
    ctx = ctx_factory()
    before = {n: p.detach().clone() for n, p in ctx.model.unet.named_parameters()}
    out = protect("uce", ctx, ctx.options)
    changed = {n for n, p in out.model.unet.named_parameters() if not torch.equal(before[n], p)}
    expected = {n for n in before if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    assert changed == expected and changed
    assert out.guard is None


def test_imma_changes_attention_weights_and_releases_a_plain_unet(ctx_factory):
    ctx = ctx_factory()
    before = {n: p.detach().clone() for n, p in ctx.model.unet.named_parameters()}
    out = protect("imma", ctx, ctx.options)
    after = dict(out.model.unet.named_parameters())
    assert after.keys() == before.keys()  # no adapter left behind
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(any(k in n for k in ("to_q", "to_k", "to_v", "to_out")) for n in changed)


def test_guard_on_uce_edits_then_freezes(ctx_factory):
    ctx = ctx_factory(0.3)
    out = protect("uce+guard", ctx, ctx.options)
    assert out.guard is not None and out.info["edit_rows"] > 0 and out.guard.method == "uce+guard"
    out.guard.check_fingerprint(out.model.unet)


def test_registry_lists_every_protection_and_refuses_unknown_ones(ctx_factory):
    from freezeasguard.protections import stages

    assert {"none", "random", "importance-change", "importance-grad", "importance-ratio", "guard", "uce", "imma",
            "immunise"} <= set(PROTECTIONS)
    with pytest.raises(ValueError, match="unknown protection"):
        protect("nope", ctx_factory())
    with pytest.raises(ValueError, match="unknown protection.*guard\\+nope"):
        stages("guard+nope")
    with pytest.raises(ValueError, match="must come first"):
        stages("guard+uce")  # a model edit after a frozen set would change frozen values
    with pytest.raises(ValueError, match="needs a frozen set"):
        stages("immunise")
    with pytest.raises(ValueError, match="unknown IMMAConfig field"):
        protect("imma", ctx_factory(), {"imma": {"step": 2}})
    with pytest.raises(ValueError, match="ReleaseContext.ratio_by"):
        ReleaseContext(None, None, None, 0.3, ratio_by="tensors")


def test_imma_adapter_follows_the_seed_not_the_global_rng(toy_data):
    from freezeasguard.protections.imma import imma_immunize

    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        model = build_tiny_model(TinySpec(), seed=0)
        imma_immunize(model, toy_data(4), steps=1, seed=seed, batch_size=2)
        return {n: p.detach().clone() for n, p in model.unet.named_parameters()}

    a, b, c = run(3, 100), run(3, 200), run(4, 100)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


# ---------------------------------------------------------------------------- importance scores rank a known case
class _TwoPaths(torch.nn.Module):
    """Illegal samples go through ill1/ill2 only, legal samples through leg1/leg2 only. The legal path is already
    exact (zero first layer, output bias = the legal target), so its loss and gradients are exactly zero."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name in ("ill1", "ill2", "leg1", "leg2"):
            layer = torch.nn.Linear(4, 4).double()
            with torch.no_grad():
                layer.weight.copy_(0.3 * torch.randn(4, 4, generator=g, dtype=torch.float64))
                layer.bias.zero_()
            setattr(self, name, layer)
        with torch.no_grad():
            self.leg1.weight.zero_()
            self.leg2.bias.copy_(_LEGAL_TARGET)

    def forward(self, batch):
        x, y, domain = batch["x"], batch["y"], batch["domain"]
        ill = self.ill2(torch.tanh(self.ill1(x)))
        leg = self.leg2(torch.tanh(self.leg1(x)))
        return ((torch.where((domain == 0)[:, None], ill, leg) - y) ** 2).mean()


_LEGAL_TARGET = torch.tensor([0.5, -0.25, 1.0, 0.0], dtype=torch.float64)


class _Domain:
    def __init__(self, domain, n=8):
        g = torch.Generator().manual_seed(10 + domain)
        self.x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        self.y = torch.randn(n, 4, generator=g, dtype=torch.float64) if domain == 0 else _LEGAL_TARGET.expand(n, 4)
        self.domain = domain

    def __len__(self):
        return len(self.x)

    def example(self, i, seed):
        return {"x": self.x[i], "y": self.y[i], "domain": self.domain}

    @staticmethod
    def collate(examples):
        from freezeasguard.data import collate_examples

        return collate_examples(examples)


class _Objective(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.unet = model.unet

    def forward(self, batch):
        return self.unet(batch)


@pytest.mark.parametrize("name", ["importance-grad", "importance-ratio", "importance-change"])
def test_importance_methods_rank_the_illegal_path_first(name, monkeypatch):
    """Only ill* tensors affect the illegal loss, and the legal path is exactly fitted: every importance score must
    put all four ill* tensors above all four leg* tensors (the legal ones score exactly 0 by grad and change)."""
    import types

    import freezeasguard.protections.importance as importance

    monkeypatch.setattr(importance, "objective_of", _Objective)  # the constructed model is its own loss ...
    monkeypatch.setattr(importance, "encoded", lambda model, data: data)  # ... on data that needs no encoding
    model = types.SimpleNamespace(unet=_TwoPaths())
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    # the warm start of importance-change: plain Adam (no weight decay), so zero gradients move nothing
    learn = LearnConfig(warm_start=TrainConfig(max_steps=10, batch_size=4, learning_rate=1e-2, weight_decay=0.0,
                                               progress=False), cache_encodings=False)
    ctx = ReleaseContext(model, _Domain(0), _Domain(1), 0.5, seed=0, ratio_by="count")
    guard = protect(name, ctx, {"importance-change": {"warm_start": learn.warm_start}}).guard
    scores = guard.scores
    ill = [n for n in scores if n.startswith("ill")]
    leg = [n for n in scores if n.startswith("leg")]
    assert sorted(guard.frozen) == sorted(ill), scores
    assert min(scores[n] for n in ill) > max(scores[n] for n in leg), scores
    if name != "importance-ratio":
        assert all(scores[n] == 0.0 for n in leg), scores
    assert all(torch.equal(before[n], p) for n, p in model.unet.named_parameters())  # the release is the base
