"""The contract every registered protection keeps, checked over the whole registry: its config is a dataclass
that round-trips through JSON; a release's guard describes the released model's values; the same seed gives
the same release; a protection that takes a ratio keeps its budget."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from freezeasguard.learn import LearnConfig
from freezeasguard.protections import PROTECTIONS, ReleaseContext, configs_for, needs_ratio, protect, stages
from freezeasguard.tiny import TinySpec, build_tiny_model
from freezeasguard.training import TrainConfig

_FAST = {
    "guard": LearnConfig(mask_every=1, mask_steps=2, mask_batch=2, ranking_samples=0,
                         user=TrainConfig(batch_size=2, progress=False),
                         warm_start=TrainConfig(max_steps=2, batch_size=2, progress=False)),
    "importance-change": {"warm_start": {"max_steps": 2, "batch_size": 2, "progress": False}},
    "importance-grad": {"n_batches": 1, "batch_size": 2},
    "importance-ratio": {"n_batches": 1, "batch_size": 2},
    "imma": {"steps": 2, "batch_size": 2},
    "immunise": {"steps": 2, "reset_every": 1, "batch_size": 2, "text_subspace": 2},
    "nullspace": {"rank": 2},
}
_PROMPTS = {"uce_edit": ["a red cat"], "uce_guide": ["a red house"], "uce_preserve": ["a blue tree"]}
RATIO = 0.3
# every protection that can stand alone, and the composites the benchmark runs
NAMES = sorted(n for n, p in PROTECTIONS.items() if n not in ("immunise", "nullspace")) + [
    "random+immunise", "freeze-cross-attention+immunise", "guard+freeze-kv+immunise", "uce+guard",
    "freeze-cross-attention+immunise+guard", "freeze-kv+nullspace", "guard+freeze-cross-attention+nullspace"]


def _release(name, toy_data, seed=0):
    ctx = ReleaseContext(build_tiny_model(TinySpec(), seed=0), toy_data(4), toy_data(4, random_flip=False), RATIO,
                         seed=seed, prompts=_PROMPTS)
    return protect(name, ctx, _FAST)


@pytest.mark.parametrize("name", sorted(PROTECTIONS))
def test_every_config_is_a_dataclass_that_round_trips_through_json(name):
    spec = PROTECTIONS[name]
    assert dataclasses.is_dataclass(spec.config_cls) and spec.description
    cfg = spec.config()
    again = spec.config(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises((TypeError, ValueError)):
        spec.config({"no_such_field": 1})


@pytest.mark.parametrize("name", NAMES)
def test_a_release_is_seeded_its_guard_matches_it_and_the_budget_holds(name, toy_data):
    a = _release(name, toy_data)
    b = _release(name, toy_data)
    ta, tb = dict(a.model.unet.named_parameters()), dict(b.model.unet.named_parameters())
    assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta), "same seed, other model"
    if a.guard is None:
        assert b.guard is None and name in ("none", "uce", "imma")
        return
    assert a.guard.frozen == b.guard.frozen, "same seed, other frozen set"
    a.guard.check_values(a.model.unet)  # the guard records the released values, not the base's
    if len(stages(name)) > 1:
        assert a.guard.method == name
    if needs_ratio(name) and len(stages(name)) == 1:
        share = a.guard.summary()["ratio_by_params"]
        assert share <= RATIO + 1e-9, f"{name} froze {share:.3f} of the parameters at ratio {RATIO}"


def test_composites_apply_their_stages_left_to_right(toy_data):
    plain = _release("freeze-cross-attention", toy_data)
    immunised = _release("freeze-cross-attention+immunise", toy_data)
    assert immunised.guard.frozen == plain.guard.frozen  # the same set ...
    base = dict(build_tiny_model(TinySpec(), seed=0).unet.named_parameters())
    moved = [n for n, p in immunised.model.unet.named_parameters() if not torch.equal(p, base[n])]
    assert moved and set(moved) <= set(plain.guard.frozen)  # ... other values, and only there
    assert set(configs_for("uce+guard")) == {"uce", "guard"}
    with pytest.raises(ValueError, match="must come first"):
        stages("random+uce")
    with pytest.raises(ValueError, match="nothing to build on"):
        stages("none+random")
