"""The guard file: construction, exact ratios, round trip, tamper detection, set algebra, model checks."""

from __future__ import annotations

import json

import pytest
import torch

from freezeasguard.guard import Guard, GuardError, block_of, select_top
from freezeasguard.tiny import TinySpec, build_tiny_model


@pytest.fixture(scope="module")
def unet():
    return build_tiny_model(TinySpec(), seed=0).unet


def test_round_trip(unet, tmp_path):
    names = [n for n, _ in unet.named_parameters()]
    scores = {n: float(i) for i, n in enumerate(names)}
    g = Guard.from_scores(unet, scores, 0.25, provenance={"note": "test"})
    path = g.save(tmp_path / "g.json")
    h = Guard.load(path)
    assert h.frozen == g.frozen and h.scores == g.scores and h.tensors == g.tensors
    assert h.fingerprint == g.fingerprint and h.provenance["note"] == "test"
    assert h.to_dict() == g.to_dict()


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.7, 1.0])
def test_ratio_by_count_is_exact(unet, ratio):
    g = Guard.random(unet, ratio, seed=1)
    n = len(list(unet.parameters()))
    assert len(g.frozen) == round(ratio * n)
    assert g.ratio_by_count == round(ratio * n) / n
    frozen_params = sum(p.numel() for name, p in unet.named_parameters() if name in g.frozen)
    assert g.ratio_by_params == frozen_params / sum(p.numel() for p in unet.parameters())


def test_ratio_by_parameter_budget(unet):
    sizes = {n: p.numel() for n, p in unet.named_parameters()}
    total = sum(sizes.values())
    g = Guard.random(unet, 0.3, seed=2, by="params")
    frozen = sum(sizes[n] for n in g.frozen)
    assert frozen <= 0.3 * total
    # greedy in score order: the best-scored tensor left out does not fit in what remains of the budget
    order = sorted(sizes, key=lambda n: (-g.scores[n], n))
    first_out = next(n for n in order if n not in g.frozen)
    assert frozen + sizes[first_out] > 0.3 * total


def test_top_k_follows_scores():
    sizes = {"a": 1, "b": 1, "c": 1, "d": 1}
    assert select_top({"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.7}, sizes, 0.5) == ["b", "d"]
    assert select_top({"a": 1, "b": 1, "c": 1, "d": 1}, sizes, 0.5) == ["a", "b"]  # ties by name
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        select_top({"a": 1}, {"a": 1}, 1.5)
    with pytest.raises(ValueError, match="non-finite"):
        select_top({"a": float("nan")}, {"a": 1}, 0.5)


def test_random_guard_is_seeded(unet):
    assert Guard.random(unet, 0.4, seed=3).frozen == Guard.random(unet, 0.4, seed=3).frozen
    assert Guard.random(unet, 0.4, seed=3).frozen != Guard.random(unet, 0.4, seed=4).frozen


def test_from_names_rejects_unknown_tensors(unet):
    with pytest.raises(GuardError, match="not UNet tensors"):
        Guard.from_names(unet, ["conv_in.weight", "no.such.tensor"])


def test_another_model_is_refused_naming_tensors(unet):
    g = Guard.random(unet, 0.3, seed=0)
    other = build_tiny_model(TinySpec(block_out_channels=(16, 48)), seed=0).unet
    with pytest.raises(GuardError, match="another model") as err:
        g.apply(other)
    assert "down_blocks.1" in str(err.value)
    # same architecture, other weights: the fingerprint matches but the frozen values do not
    twin = build_tiny_model(TinySpec(), seed=5).unet
    with pytest.raises(GuardError, match="frozen tensors differ"):
        g.apply(twin)


def test_apply_sets_requires_grad(unet):
    g = Guard.random(unet, 0.3, seed=0)
    trainable = g.apply(unet)
    for name, p in unet.named_parameters():
        assert p.requires_grad == (name not in g.frozen)
    assert sorted(trainable) == sorted(set(n for n, _ in unet.named_parameters()) - set(g.frozen))


def _edit(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_corrupt_or_hand_edited_files_fail_clearly(unet, tmp_path):
    g = Guard.random(unet, 0.3, seed=0)
    path = g.save(tmp_path / "g.json")
    text = path.read_text()

    path.write_text(text[: len(text) // 2])
    with pytest.raises(GuardError, match="not a readable JSON"):
        Guard.load(path)

    path.write_text(text)
    _edit(path, lambda d: d["frozen"].pop())
    with pytest.raises(GuardError, match="checksum mismatch"):
        Guard.load(path)

    path.write_text(text)
    _edit(path, lambda d: d.update(format="something-else"))
    with pytest.raises(GuardError, match="not a freezeasguard-guard"):
        Guard.load(path)

    path.write_text(text)
    _edit(path, lambda d: d.update(version=99))
    with pytest.raises(GuardError, match="version 99"):
        Guard.load(path)

    with pytest.raises(GuardError, match="no such guard file"):
        Guard.load(tmp_path / "missing.json")


def test_edit_with_recomputed_checksum_is_still_caught(unet, tmp_path):
    """Someone who recomputes the checksum after editing still cannot make an inconsistent guard."""
    from freezeasguard.guard import _checksum

    g = Guard.random(unet, 0.3, seed=0)
    data = g.to_dict()
    data["frozen"] = data["frozen"][:-1]
    data.pop("checksum")
    data["checksum"] = _checksum(data)
    with pytest.raises(GuardError, match="one record per frozen name|recorded ratio"):
        Guard.from_dict(data)


def test_union_intersection_diff(unet):
    a = Guard.random(unet, 0.3, seed=0)
    b = Guard.random(unet, 0.3, seed=1)
    union, inter = a.union(b), a.intersection(b)
    assert set(union.frozen) == set(a.frozen) | set(b.frozen)
    assert set(inter.frozen) == set(a.frozen) & set(b.frozen)
    d = a.diff(b)
    assert set(d["only_self"]) == set(a.frozen) - set(b.frozen)
    assert set(d["only_other"]) == set(b.frozen) - set(a.frozen)
    assert set(d["both"]) == set(inter.frozen)
    assert union.ratio_by_count == len(union.frozen) / len(a.names)
    # a combined guard is a valid guard: it round-trips and still checks values
    assert Guard.from_dict(union.to_dict()).frozen == union.frozen
    other = Guard.random(build_tiny_model(TinySpec(block_out_channels=(16, 48))).unet, 0.3)
    with pytest.raises(GuardError, match="different models"):
        a.union(other)


def test_per_block_counts_add_up(unet):
    g = Guard.random(unet, 0.5, seed=0)
    rows = g.per_block()
    assert sum(r["tensors"] for r in rows) == len(g.names)
    assert sum(r["frozen"] for r in rows) == len(g.frozen)
    assert {r["block"] for r in rows} >= {"conv_in", "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0"}
    assert block_of("down_blocks.1.attentions.0.proj_in.weight", depth=3) == "down_blocks.1.attentions"
    assert block_of("mid_block.resnets.0.conv1.weight", depth=3) == "mid_block.resnets"
