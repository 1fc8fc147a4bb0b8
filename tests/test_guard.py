"""The guard file: construction, exact ratios, round trip, tamper detection, set algebra, model checks."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import without_sketches
from freezeasguard.guard import Guard, GuardError, _checksum, block_of, select_top
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
    g = Guard.random(unet, ratio, seed=1, ratio_by="count")
    n = len(list(unet.parameters()))
    assert len(g.frozen) == round(ratio * n)
    assert g.ratio_by_count == round(ratio * n) / n
    frozen_params = sum(p.numel() for name, p in unet.named_parameters() if name in g.frozen)
    assert g.ratio_by_params == frozen_params / sum(p.numel() for p in unet.parameters())


def test_ratio_by_parameter_budget(unet):
    sizes = {n: p.numel() for n, p in unet.named_parameters()}
    total = sum(sizes.values())
    g = Guard.random(unet, 0.3, seed=2, ratio_by="params")
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


def test_combinations_keep_the_text_encoder_rule(unet):
    import dataclasses

    a = dataclasses.replace(Guard.random(unet, 0.3, seed=0), allow_text_encoder=True)
    b = Guard.random(unet, 0.3, seed=1)
    # the union freezes what either freezes (the text encoder included), the intersection what both freeze
    assert a.union(b).allow_text_encoder is False and b.union(a).allow_text_encoder is False
    assert a.intersection(b).allow_text_encoder is True
    both = dataclasses.replace(b, allow_text_encoder=True)
    assert a.union(both).allow_text_encoder is True
    assert Guard.from_dict(a.intersection(b).to_dict()).allow_text_encoder is True
    assert a.diff(b)["allow_text_encoder"] == [True, False]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_loaded_in_lower_precision_is_the_same_model(dtype):
    """One rule for Guard.apply and verify: precision is storage; the values must be the base rounded."""
    model = build_tiny_model(TinySpec(), seed=0).unet
    g = Guard.random(model, 0.3, seed=0)
    low = build_tiny_model(TinySpec(), seed=0).unet.to(dtype)
    trainable = g.apply(low)
    assert sorted(trainable) == sorted(n for n in g.names if n not in g.frozen)
    from freezeasguard.audit import check_tensors

    report = check_tensors(g, dict(low.named_parameters()))
    assert report.compliant and {f.status for f in report.findings} == {"ok_lower_precision"}
    with torch.no_grad():
        dict(low.named_parameters())[g.frozen[0]].mul_(2)
    with pytest.raises(GuardError, match="frozen tensors differ") as err:
        g.apply(low)
    assert g.frozen[0] in str(err.value)
    assert not check_tensors(g, dict(low.named_parameters())).compliant


def test_an_integer_dtype_is_another_model(unet):
    g = Guard.random(unet, 0.3, seed=0)
    tensors = {n: p.detach() for n, p in unet.named_parameters()}
    tensors[g.names[0]] = tensors[g.names[0]].to(torch.int32)
    with pytest.raises(GuardError, match="another model"):
        g.check_fingerprint(tensors)


def test_the_guard_file_format_does_not_import_the_auditor():
    import ast
    import inspect

    import freezeasguard.guard as guard_module

    tree = ast.parse(inspect.getsource(guard_module))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(m and m.endswith("audit") for m in imported), imported
    assert not hasattr(Guard, "is_frozen")


def test_value_sketch_estimates_distance_and_needs_no_library_rng():
    from freezeasguard.guard import SKETCH, tensor_sketch

    g = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(20):
        a = torch.randn(300, 7, generator=g)
        b = a + 0.01 * torch.randn(300, 7, generator=g)
        est = (torch.tensor(tensor_sketch(a)) - torch.tensor(tensor_sketch(b))).pow(2).sum().sqrt()
        ratios.append(float(est / (a - b).double().norm()))
    assert all(0.4 < r < 1.7 for r in ratios), ratios  # chi distribution, 16 degrees of freedom
    assert 0.8 < sum(ratios) / len(ratios) < 1.2
    torch.manual_seed(123)
    a = torch.randn(50)
    assert tensor_sketch(a) == tensor_sketch(a.clone()) and len(tensor_sketch(a)) == SKETCH["k"]
    assert tensor_sketch(a) != tensor_sketch(a, seed=1)
    # a change in one element is measured exactly, however large the tensor
    b = a.clone()
    b[17] += 0.5
    est = (torch.tensor(tensor_sketch(a)) - torch.tensor(tensor_sketch(b))).pow(2).sum().sqrt()
    assert abs(float(est) - 0.5) < 1e-6


def test_moving_values_between_positions_moves_the_sketch():
    """Every element enters every projection with its own sign: a permutation, a negation, or a shuffle within
    the buckets of the count sketch that older guards hold is far from the base, while the count sketch of a
    within-bucket shuffle is unchanged."""
    import hashlib

    import numpy as np

    from freezeasguard.guard import COUNT_SKETCH, tensor_sketch

    def distance(a, b, **kw):
        return float((torch.tensor(tensor_sketch(a, **kw)) - torch.tensor(tensor_sketch(b, **kw))).pow(2).sum().sqrt()
                     / a.double().norm())

    g = torch.Generator().manual_seed(1)
    a = torch.randn(4096, generator=g)
    # the count sketch's bucket and sign per element, as `tensor_sketch` reads them
    byte = np.frombuffer(hashlib.shake_256(f"freezeasguard-sketch|0|{a.numel()}".encode()).digest(a.numel()), np.uint8)
    key = torch.from_numpy((byte & 15).astype(np.int64) * 2 + (byte >= 128))
    shuffled = a.clone()
    for value in key.unique():
        where = (key == value).nonzero().flatten()
        shuffled[where] = a[where[torch.randperm(len(where), generator=g)]]
    assert (shuffled - a).norm() / a.norm() > 1.0  # a large change...
    assert distance(a, shuffled, method=COUNT_SKETCH, k=16) < 1e-12  # ...the count sketch cannot see
    for changed in (shuffled, a.flip(0), -a, a[torch.randperm(a.numel(), generator=g)]):
        truth = float((changed - a).double().norm() / a.double().norm())
        assert 0.5 * truth < distance(a, changed) < 1.6 * truth, (truth, distance(a, changed))
    # chunked hashing: a tensor larger than one chunk still measures a one-element change exactly
    big = torch.randn(70_000, generator=g)
    moved = big.clone()
    moved[69_999] += 2.0
    assert abs(distance(big, moved) * float(big.double().norm()) - 2.0) < 1e-9


def test_a_guard_file_without_sketches_still_loads(unet, tmp_path):
    from freezeasguard.guard import _checksum

    data = without_sketches(Guard.random(unet, 0.3, seed=0))
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = Guard.load(tmp_path / "old.json")
    assert old.sketch is None and old.to_dict()["checksum"] == data["checksum"]
    # a sketch record without the file's sketch parameters, or a record without digests, is refused
    bad = json.loads(json.dumps(data))
    bad["tensors"][bad["frozen"][0]]["sketch"] = [0.0] * 16
    bad["checksum"] = _checksum({k: v for k, v in bad.items() if k != "checksum"})
    with pytest.raises(GuardError, match="sketch"):
        Guard.from_dict(bad)
    bad = json.loads(json.dumps(data))
    del bad["tensors"][bad["frozen"][0]]["digests"]
    bad["checksum"] = _checksum({k: v for k, v in bad.items() if k != "checksum"})
    with pytest.raises(GuardError, match="digests"):
        Guard.from_dict(bad)


def test_digest_names_what_the_guard_enforces(unet):
    import dataclasses

    g = Guard.random(unet, 0.3, seed=0)
    assert dataclasses.replace(g, created="another day", provenance={"x": 1}).digest() == g.digest()
    assert dataclasses.replace(g, allow_text_encoder=True).digest() != g.digest()
    assert Guard.random(unet, 0.3, seed=1).digest() != g.digest()


def test_combining_an_old_guard_with_a_new_one_drops_the_sketches_consistently(unet):
    new = Guard.random(unet, 0.3, seed=0)
    old = Guard.from_dict(without_sketches(Guard.random(unet, 0.3, seed=1)))
    union = new.union(old)
    assert union.sketch is None and all("sketch" not in r for r in union.tensors.values())
    assert Guard.from_dict(union.to_dict()).frozen == union.frozen
    assert all("sketch" in r for r in new.tensors.values())  # the operands are left as they were


def test_text_encoder_values_are_recorded_exactly_when_the_guard_keeps_them_frozen(tmp_path):
    import dataclasses

    from freezeasguard.guard import record_match

    model = build_tiny_model(TinySpec(), seed=0)
    g = Guard.random(model.unet, 0.3, seed=0).with_text_encoders(model)
    records = g.text_encoders["text_encoder"]
    state = model.text_encoder.state_dict()
    assert set(records) == set(state) and all(record_match(state[n], records[n]) == "ok" for n in state)
    assert record_match(state[next(iter(state))].half(), records[next(iter(state))]) == "ok_lower_precision"
    loaded = Guard.load(g.save(tmp_path / "g.json"))
    assert loaded.text_encoders == g.text_encoders and loaded.digest() == g.digest()
    assert dataclasses.replace(g, text_encoders=None).digest() != g.digest()  # part of what the guard enforces
    assert dataclasses.replace(g, allow_text_encoder=True).with_text_encoders(model).text_encoders is None
    # a union keeps the records (it keeps the text encoder frozen); an intersection with a guard that lets it
    # train drops them; guards recording different text encoders do not combine
    other = Guard.random(model.unet, 0.3, seed=1)
    assert g.union(other).text_encoders == g.text_encoders
    assert g.intersection(dataclasses.replace(other, allow_text_encoder=True)).text_encoders is None
    forged = {"text_encoder": {**records, next(iter(records)): {"dtype": "float32", "digests": {"float32": "0" * 64}}}}
    with pytest.raises(GuardError, match="different text encoders"):
        g.union(dataclasses.replace(other, text_encoders=forged))
    # the file refuses records under a guard that lets the text encoder train, and malformed ones
    for edit, match in ((lambda d: d.update(allow_text_encoder=True), "allow_text_encoder"),
                        (lambda d: d.update(text_encoders={"vae": records}), "text_encoder"),
                        (lambda d: d["text_encoders"]["text_encoder"].update(x={"dtype": "float32"}), "digests")):
        data = json.loads(json.dumps(g.to_dict()))
        edit(data)
        data["checksum"] = _checksum({k: v for k, v in data.items() if k != "checksum"})
        with pytest.raises(GuardError, match=match):
            Guard.from_dict(data)
