"""Which tensors to immunise (freezeasguard.protections.selection) and the immunise stage that frees them."""

from __future__ import annotations

import pytest
import torch

from freezeasguard.protections import ReleaseContext, protect
from freezeasguard.protections.immunise import ImmuniseConfig, illegal_text_subspace, immunise_frozen
from freezeasguard.protections.selection import SelectConfig, immunise_scores
from freezeasguard.tiny import TinySpec, build_tiny_model

FAST = SelectConfig(restarts=2, horizon=2, batch_size=2)


def _params(model):
    return {n: p.detach().clone() for n, p in model.unet.named_parameters()}


def test_the_selection_keeps_the_earlier_frozen_set_fills_the_ratio_and_changes_no_value(toy_data, tmp_path):
    from freezeasguard.protections.components import component_names

    illegal, legal = toy_data(4), toy_data(4, random_flip=False)
    runs = []
    for run in range(2):
        model = build_tiny_model(TinySpec(), seed=0)
        before = _params(model)
        out = protect("freeze-cross-attention+immunise-select",
                      ReleaseContext(model, illegal, legal, 0.5, seed=0, output_dir=tmp_path / str(run),
                                     ratio_by="params"), {"immunise-select": FAST})
        after = _params(out.model)
        assert all(torch.equal(before[n], after[n]) for n in before)  # only the frozen set changes
        runs.append(sorted(out.guard.frozen))
    xattn = set(component_names(model.unet, "freeze-cross-attention"))
    frozen = set(runs[0])
    assert xattn < frozen and runs[0] == runs[1]  # seeded
    sizes = {n: p.numel() for n, p in model.unet.named_parameters()}
    share = sum(sizes[n] for n in frozen) / sum(sizes.values())
    assert share <= 0.5 + 1e-9
    # greedy by score: no tensor left out would have fitted the budget with a higher score than one taken
    scores = out.guard.scores
    room = 0.5 * sum(sizes.values()) - sum(sizes[n] for n in frozen)
    taken = frozen - xattn
    assert taken and all(scores[n] <= min(scores[t] for t in taken) or sizes[n] > room
                         for n in sizes if n not in frozen)
    with pytest.raises(ValueError, match="would thaw"):
        protect("freeze-cross-attention+immunise-select",
                ReleaseContext(build_tiny_model(TinySpec(), seed=0), illegal, legal, 0.01, seed=0,
                               output_dir=tmp_path / "low", ratio_by="params"), {"immunise-select": FAST})


def test_scores_read_the_attacked_model_and_leave_it_as_released(toy_data):
    illegal, legal = toy_data(4), toy_data(4, random_flip=False)
    model = build_tiny_model(TinySpec(), seed=0)
    before = _params(model)
    frozen = {n for n in before if ".attn2." in n}
    table = immunise_scores(model, frozen, illegal, legal, FAST, seed=0)
    assert set(table) == set(before) - frozen
    assert all(torch.equal(before[n], p) for n, p in model.unet.named_parameters())
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert all(t["harm"] >= 0 and t["cost"] >= 0 and t["need"] >= 0 for t in table.values())
    assert any(t["harm"] > 0 for t in table.values())
    # a zero legal weight ranks by harm over cost alone; a large one pushes the legal user's tensors down
    loose = immunise_scores(model, frozen, illegal, legal, SelectConfig(restarts=2, horizon=2, batch_size=2,
                                                                        legal_weight=0.0), seed=0)
    assert all(loose[n]["harm"] == table[n]["harm"] for n in table)  # the same attackers
    assert all(loose[n]["score"] >= table[n]["score"] for n in table)
    with pytest.raises(ValueError, match="restarts"):
        SelectConfig(restarts=0)
    with pytest.raises(ValueError, match="every UNet tensor is frozen"):
        immunise_scores(model, set(before), illegal, legal, FAST)


def test_free_tensors_move_the_image_side_freely_and_key_values_only_in_the_text_subspace(toy_data):
    illegal, legal = toy_data(4), toy_data(4, random_flip=False)
    model = build_tiny_model(TinySpec(), seed=0)
    before = _params(model)
    xattn = sorted(n for n in before if ".attn2.to_" in n)
    image_side = sorted(n for n in before if ".resnets.0.conv1.weight" in n)
    cfg = ImmuniseConfig(steps=3, reset_every=3, batch_size=2, lr=1e-2, text_subspace=2, free_tensors=True)
    immunise_frozen(model, xattn + image_side, illegal, legal, cfg, seed=0, progress=False)
    after = dict(model.unet.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert set(image_side) <= changed and changed <= set(xattn + image_side)
    assert all(".to_q." not in n and ".to_out." not in n for n in changed)  # text-side, only K/V move
    for n in image_side:  # the image side within its own, tighter trust region
        assert float((after[n] - before[n]).norm()) <= cfg.free_max_change * float(before[n].norm()) * (1 + 1e-5)
    with torch.no_grad():
        empty = model.encode_prompts([""])
    proj, _ = illegal_text_subspace(*(_enc(model, d) for d in (illegal, legal)), 2, keep=empty)
    for n in changed - set(image_side):
        delta = after[n] - before[n]
        assert float((delta - delta @ proj).norm()) <= 1e-4 * float(delta.norm())


def _enc(model, data):
    from freezeasguard.protections.common import encoded

    return encoded(model, data).embeddings


def test_the_selected_release_immunises_the_chosen_image_side_after_the_cross_attention(toy_data, tmp_path):
    from freezeasguard.protections.components import component_names

    illegal, legal = toy_data(4), toy_data(4, random_flip=False)
    model = build_tiny_model(TinySpec(), seed=0)
    before = _params(model)
    immunise = ImmuniseConfig(steps=2, reset_every=2, batch_size=2, lr=1e-2, text_subspace=2, free_tensors=True)
    out = protect("freeze-cross-attention+immunise+immunise-select+immunise",
                  ReleaseContext(model, illegal, legal, 0.5, seed=0, output_dir=tmp_path, ratio_by="params"),
                  {"immunise-select": FAST, "immunise": immunise})
    after = _params(out.model)
    xattn = set(component_names(out.model.unet, "freeze-cross-attention"))
    selected = set(out.guard.frozen) - xattn
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    movable = {n for n in selected if bool(before[n].any())}  # the trust region is relative: a zero tensor stays
    assert movable and movable <= changed <= set(out.guard.frozen)
    assert not any(".to_q." in n or ".to_out." in n for n in changed & xattn)
    out.guard.check_fingerprint(out.model.unet)
    assert not (tmp_path / "immunise-checkpoint").exists()
