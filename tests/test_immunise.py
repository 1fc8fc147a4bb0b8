"""Immunised frozen values (freezeasguard.protections.immunise and the "+immunise" composites)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from freezeasguard.guard import Guard, record_match
from freezeasguard.protections import ReleaseContext, protect
from freezeasguard.protections.common import encoded as _encoded
from freezeasguard.protections.common import objective_of as _objective
from freezeasguard.protections.common import seeded_batches as _batches
from freezeasguard.protections.immunise import (
    ImmuniseConfig,
    illegal_text_subspace,
    immunise_frozen,
    pull_into_trust_region_,
)
from freezeasguard.tiny import TinySpec, build_tiny_model


def _frozen_names(model, share=0.3):
    return list(Guard.random(model.unet, share, seed=3).frozen)


@pytest.mark.parametrize("legal_at", ["attacked", "user"])
def test_only_the_frozen_tensors_change_and_each_stays_in_its_trust_region(legal_at, toy_data, tmp_path):
    model = build_tiny_model(TinySpec(), seed=0)
    frozen = _frozen_names(model)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    cfg = ImmuniseConfig(steps=6, reset_every=3, batch_size=2, lr=1e-2, max_change=0.02, legal_at=legal_at,
                         text_subspace=0)
    info = immunise_frozen(model, frozen, toy_data(4), toy_data(4, random_flip=False), cfg, seed=1,
                           output_dir=tmp_path, progress=False)
    after = dict(model.unet.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= set(frozen)  # the trainable rest is restored to the release bit for bit
    for n in frozen:
        moved = float((after[n] - before[n]).norm())
        assert moved <= 0.02 * float(before[n].norm()) * (1 + 1e-5) + 1e-12  # a zero tensor stays zero
    assert info["immunised_tensors"] == len(frozen) and (tmp_path / "immunise.json").is_file()
    assert not any(p.requires_grad for p in model.unet.parameters())


def test_trust_region_pulls_back_only_tensors_that_left_it():
    o = [torch.ones(4), torch.ones(4)]
    v = [torch.ones(4) * 3, torch.ones(4) * 1.01]
    pull_into_trust_region_(v, o, 0.1)
    assert float((v[0] - o[0]).norm()) == pytest.approx(0.1 * float(o[0].norm()))
    assert torch.equal(v[1], torch.ones(4) * 1.01)


def _attacked_illegal_loss(model, frozen, illegal, steps=4, seed=9):
    """The illegal loss after a short attack on the trainable rest (the frozen set held), as a user would run it."""
    m = copy.deepcopy(model)
    objective = _objective(m)
    for p in objective.parameters():
        p.requires_grad_(False)
    rest = [p for n, p in m.unet.named_parameters() if n not in set(frozen)]
    for p in rest:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(rest, lr=1e-3)
    enc = _encoded(m, illegal)
    for batch in _batches(enc, steps, 4, seed):
        objective(batch).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return sum(float(objective(b)) for b in _batches(enc, 4, 4, seed + 1)) / 4


def test_immunised_values_make_the_attacked_model_worse_on_the_illegal_data(toy_data):
    """The defender ascends the attacked model's illegal loss: after immunising, the same attack (same seeds)
    ends at a higher illegal loss than on the plain release. With legal_weight 0 nothing holds it back."""
    model = build_tiny_model(TinySpec(), seed=0)
    frozen = [n for n in Guard.random(model.unet, 0.5, seed=0).frozen]
    illegal, legal = toy_data(4), toy_data(4, random_flip=False)
    plain = _attacked_illegal_loss(model, frozen, illegal)
    immunise_frozen(model, frozen, illegal, legal, ImmuniseConfig(steps=8, reset_every=4, batch_size=4, lr=1e-2,
                    attack_lr=1e-3, legal_weight=0.0, max_change=0.5, text_subspace=0), seed=0, progress=False)
    immunised = _attacked_illegal_loss(model, frozen, illegal)
    assert immunised > plain * 1.05, (plain, immunised)


@pytest.mark.parametrize("base", ["random", "freeze-cross-attention"])
def test_immunised_methods_release_a_guard_recording_the_new_values(base, toy_data):
    model = build_tiny_model(TinySpec(), seed=0)
    opts = {"immunise": ImmuniseConfig(steps=2, reset_every=1, batch_size=2, lr=1e-2, text_subspace=2)}
    out = protect(f"{base}+immunise", ReleaseContext(model, toy_data(4), toy_data(4, random_flip=False), 0.3,
                                                     seed=0), opts)
    plain = protect(base, ReleaseContext(build_tiny_model(TinySpec(), seed=0), None, None, 0.3, seed=0))
    assert out.guard.frozen == plain.guard.frozen  # the same frozen set, other values
    tensors = dict(out.model.unet.named_parameters())
    assert all(record_match(tensors[n], out.guard.tensors[n]) == "ok" for n in out.guard.frozen)
    assert any(record_match(tensors[n], plain.guard.tensors[n]) is None for n in out.guard.frozen)
    out.guard.check_fingerprint(out.model.unet)
    assert out.guard.method == f"{base}+immunise" and out.info["immunised_tensors"] == len(out.guard.frozen)


def test_immunise_config_refuses_nonsense():
    with pytest.raises(ValueError, match="max_change"):
        ImmuniseConfig(max_change=0)
    with pytest.raises(ValueError, match="steps"):
        ImmuniseConfig(steps=0)
    with pytest.raises(ValueError, match="attack_lr_spread"):
        ImmuniseConfig(attack_lr_spread=0.5)
    with pytest.raises(ValueError, match="legal_at"):
        ImmuniseConfig(legal_at="nowhere")
    with pytest.raises(ValueError, match="unknown"):
        ImmuniseConfig.from_dict({"stepz": 3})


def test_a_legal_user_term_takes_the_legal_gradient_at_the_legal_users_model(toy_data):
    """With a still attacker and a still legal user (rate ~0) both stay at the release, so "user" must give
    the values "attacked" gives (same batches); a legal user that learns moves the legal gradient elsewhere."""
    illegal, legal = toy_data(4), toy_data(4, random_flip=False)
    out = {}
    for legal_at, attack_lr in (("attacked", 1e-12), ("user", 1e-12), ("user", 1e-2)):
        model = build_tiny_model(TinySpec(), seed=0)
        frozen = set(_frozen_names(model))
        cfg = ImmuniseConfig(steps=3, reset_every=3, batch_size=2, lr=1e-2, attack_lr=attack_lr,
                             legal_weight=5.0, legal_at=legal_at, text_subspace=0)
        immunise_frozen(model, sorted(frozen), illegal, legal, cfg, seed=0, progress=False)
        out[legal_at, attack_lr] = torch.cat([p.detach().flatten() for n, p in model.unet.named_parameters()
                                              if n in frozen])
    # Not bit-equal: the user's pass takes grads of the rest too, and Adam turns reduction-order noise on
    # near-zero gradients into steps of up to lr (measured on 0.02% of the elements); count the elements.
    def share_moved(a, b):
        return float(((a - b).abs() > 1e-4).float().mean())

    assert share_moved(out["attacked", 1e-12], out["user", 1e-12]) < 0.01
    assert share_moved(out["user", 1e-12], out["user", 1e-2]) > 0.1


def test_illegal_text_subspace_finds_the_directions_only_illegal_captions_use():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(200, 8, generator=g) * torch.tensor([0, 0, 1, 1, 1, 1, 1, 1.0])
    illegal = shared.clone()
    illegal[:, 0] += 3 * torch.randn(200, generator=g)  # axis 0: illegal only
    illegal[:, 1] += 0.5 * torch.randn(200, generator=g)  # axis 1: illegal only, weaker
    legal = shared + 0.01 * torch.randn(200, 8, generator=g)
    proj, info = illegal_text_subspace(illegal, legal, 1)
    assert float(proj[0, 0]) > 0.95 and float(torch.diagonal(proj)[2:].max()) < 1e-2
    proj2, info2 = illegal_text_subspace(illegal, legal, 2)
    assert torch.allclose(torch.diagonal(proj2)[:2], torch.ones(2), atol=1e-2)
    assert info2["illegal_energy_share"] > 0.5 and info2["legal_energy_share"] < 1e-3
    assert info2["energy_ratios"][0] >= info2["energy_ratios"][1] > 1
    with pytest.raises(ValueError, match="text_subspace"):
        illegal_text_subspace(illegal, legal, 9)
    # the empty prompt's directions are held: with axis 0 in it, the subspace falls back to axis 1
    keep = torch.zeros(3, 8)
    keep[:, 0] = 1.0
    proj3, info3 = illegal_text_subspace(illegal, legal, 1, keep=keep)
    assert float(proj3[0, 0]) < 1e-6 and float(proj3[1, 1]) > 0.95 and info3["held_directions"] == 1
    assert info3["kept_energy_share"] < 1e-6


def test_token_selective_immunising_moves_only_key_value_rows_inside_the_illegal_subspace(toy_data):
    model = build_tiny_model(TinySpec(), seed=0)
    frozen = sorted(n for n, _ in model.unet.named_parameters() if ".attn2.to_" in n)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    illegal, legal = toy_data(4), toy_data(4, random_flip=False)
    cfg = ImmuniseConfig(steps=3, reset_every=3, batch_size=2, lr=1e-2, text_subspace=2)
    info = immunise_frozen(model, frozen, illegal, legal, cfg, seed=0, progress=False)
    after = dict(model.unet.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)
    with torch.no_grad():
        empty = model.encode_prompts([""])
    proj, _ = illegal_text_subspace(_encoded(model, illegal).embeddings, _encoded(model, legal).embeddings, 2,
                                    keep=empty)
    assert float((empty.reshape(-1, proj.shape[0]) @ proj).norm()) < 0.01 * float(empty.norm())
    for n in changed:
        delta = after[n] - before[n]
        assert float((delta - delta @ proj).norm()) <= 1e-4 * float(delta.norm())  # rows inside the subspace
    assert info["text_subspace"]["rank"] == 2
    # a frozen set without K/V has nothing to carry the values: released as it is, with a warning
    no_kv = [n for n in frozen if ".to_q." in n]
    held = {n: p.detach().clone() for n, p in model.unet.named_parameters() if n in no_kv}
    with pytest.warns(UserWarning, match="K/V"):
        info = immunise_frozen(model, no_kv, illegal, legal, cfg, seed=0, progress=False)
    assert all(torch.equal(held[n], p) for n, p in model.unet.named_parameters() if n in held)
    assert "nothing immunised" in info["text_subspace"]["note"]


@pytest.mark.parametrize("extra", ["freeze-kv", "freeze-cross-attention"])
def test_guard_plus_extra_freezes_the_added_tensors_and_immunises_only_key_values(extra, toy_data, tmp_path):
    from freezeasguard.learn import LearnConfig
    from freezeasguard.protections.components import component_names
    from freezeasguard.training import TrainConfig

    user = TrainConfig(batch_size=2, learning_rate=1e-3, progress=False)
    warm = TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-3, progress=False)
    learn = LearnConfig(ratio=0.1, mask_every=2, mask_steps=2, mask_batch=2, mask_lr=0.05, user=user, warm_start=warm)
    opts = {"guard": learn, "immunise": ImmuniseConfig(steps=2, reset_every=2, batch_size=2, text_subspace=2)}
    illegal, legal = toy_data(4), toy_data(4, random_flip=False)
    plain = protect("guard", ReleaseContext(build_tiny_model(TinySpec(), seed=0), illegal, legal, 0.1, seed=0,
                                            output_dir=tmp_path / "plain"), opts)
    out = protect(f"guard+{extra}+immunise", ReleaseContext(build_tiny_model(TinySpec(), seed=0), illegal, legal, 0.1,
                                                            seed=0, output_dir=tmp_path / extra), opts)
    kv = {n for n, _ in out.model.unet.named_parameters() if n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))}
    added = set(component_names(out.model.unet, extra))
    assert kv <= added
    assert set(out.guard.frozen) == set(plain.guard.frozen) | added  # the learned set (same seed) plus the extra
    assert added - set(plain.guard.frozen) and out.guard.method == f"guard+{extra}+immunise"
    tensors = dict(out.model.unet.named_parameters())
    base = dict(build_tiny_model(TinySpec(), seed=0).unet.named_parameters())
    moved = {n for n in out.guard.frozen if not torch.equal(tensors[n], base[n])}
    assert moved and moved <= kv  # token-selective: only key/value weights carry new values
    out.guard.check_fingerprint(out.model.unet)


def test_an_attack_rate_spread_draws_seeded_rates_within_its_range(toy_data, tmp_path):
    illegal, legal = toy_data(4), toy_data(4, random_flip=False)
    rates = []
    for run in range(2):
        model = build_tiny_model(TinySpec(), seed=0)
        cfg = ImmuniseConfig(steps=4, reset_every=2, batch_size=2, text_subspace=0, attack_lr=1e-4, attack_lr_spread=10)
        immunise_frozen(model, _frozen_names(model), illegal, legal, cfg, seed=0, output_dir=tmp_path / str(run),
                        progress=False)
        history = json.loads((tmp_path / str(run) / "immunise.json").read_text())["history"]
        rates.append([h["attack_lr"] for h in history])
    assert rates[0] == rates[1]  # seeded
    assert all(1e-4 <= r <= 1e-3 for r in rates[0]) and rates[0][0] != rates[0][2]  # a new draw per restart
    assert rates[0][0] == rates[0][1]  # one rate between restarts


def test_the_immunise_command_releases_a_model_and_its_guard_together(tmp_path):
    from typer.testing import CliRunner

    from conftest import CAPTIONS, toy_images
    from freezeasguard.cli import app
    from freezeasguard.data import write_imagefolder
    from freezeasguard.guard import Guard, GuardError
    from freezeasguard.model import DiffusionModel
    from freezeasguard.tiny import write_tiny_model

    base_dir = write_tiny_model(tmp_path / "base", TinySpec())
    base = DiffusionModel.from_pretrained(base_dir)
    ill = write_imagefolder(tmp_path / "ill", toy_images(4, 16), [CAPTIONS[0]] * 4)
    leg = write_imagefolder(tmp_path / "leg", toy_images(4, 16, seed=1), [CAPTIONS[1]] * 4)
    Guard.random(base.unet, 0.2, seed=0).save(tmp_path / "g.json")
    cfg = tmp_path / "imm.json"
    cfg.write_text(json.dumps({"reset_every": 2, "batch_size": 2}))
    args = ["immunise", "--model", str(base_dir), "--guard", str(tmp_path / "g.json"), "--illegal", str(ill),
            "--legal", str(leg), "--add", "kv", "--immunise-steps", "2", "--text-subspace", "2", "--config", str(cfg)]
    result = CliRunner().invoke(app, args + ["--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    released = DiffusionModel.from_pretrained(tmp_path / "out" / "model")
    guard = Guard.load(tmp_path / "out" / "guard.json")
    guard.check_values(released.unet)  # the guard describes the released values ...
    kv = {n for n, _ in released.unet.named_parameters() if n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))}
    assert kv <= set(guard.frozen) and guard.provenance["immunised"] and guard.method == "random+freeze-kv+immunise"
    with pytest.raises(GuardError, match="differ from the guard's record"):  # ... not the base's: release both
        guard.check_values(base.unet)
    record = json.loads((tmp_path / "out" / "immunise.json").read_text())
    assert record["add"] == "kv" and record["immunise"]["steps"] == 2 and len(record["history"]) == 2
    # a guard of another model (same architecture, other values) is refused before any work; nothing is written
    other = build_tiny_model(TinySpec(), seed=1)
    Guard.random(other.unet, 0.2, seed=0).save(tmp_path / "other.json")
    args[4] = str(tmp_path / "other.json")
    bad = CliRunner().invoke(app, args + ["--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "differ from the guard's record" in bad.output, bad.output
    assert not (tmp_path / "bad" / "guard.json").exists() and not (tmp_path / "bad" / "model").exists()


def test_a_guard_learned_on_the_immunised_cross_attention_keeps_it_frozen_and_spends_only_the_rest(toy_data, tmp_path):
    from freezeasguard.learn import LearnConfig
    from freezeasguard.protections.components import component_names
    from freezeasguard.training import TrainConfig

    user = TrainConfig(batch_size=2, learning_rate=1e-3, progress=False)
    warm = TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-3, progress=False)
    learn = LearnConfig(ratio=0.3, mask_every=2, mask_steps=2, mask_batch=2, mask_lr=0.05, user=user, warm_start=warm)
    opts = {"guard": learn, "immunise": ImmuniseConfig(steps=2, reset_every=2, batch_size=2, text_subspace=2)}
    illegal, legal = toy_data(4), toy_data(4, random_flip=False)
    first = protect("freeze-cross-attention+immunise", ReleaseContext(build_tiny_model(TinySpec(), seed=0), illegal,
                                                                      legal, 0.0, seed=0), opts)
    out = protect("freeze-cross-attention+immunise+guard",
                  ReleaseContext(build_tiny_model(TinySpec(), seed=0), illegal, legal, 0.3, seed=0,
                                 output_dir=tmp_path, ratio_by="params"), opts)
    xattn = set(component_names(out.model.unet, "freeze-cross-attention"))
    tensors = dict(out.model.unet.named_parameters())
    # The release is the immunised one (same seed, same values), and its guard fingerprints those values.
    assert all(torch.equal(tensors[n], p) for n, p in first.model.unet.named_parameters())
    out.guard.check_fingerprint(out.model.unet)
    assert xattn < set(out.guard.frozen)  # the mask added tensors beyond the immunised set
    sizes = {n: p.numel() for n, p in tensors.items()}
    frozen_share = sum(sizes[n] for n in out.guard.frozen) / sum(sizes.values())
    assert frozen_share <= 0.3 + 1e-9  # the ratio counts the immunised set
    assert out.guard.provenance["always_frozen"] == len(xattn)
    assert (tmp_path / "learn" / "guard.json").is_file()


def test_always_frozen_must_leave_the_mask_a_budget(toy_data):
    from freezeasguard.learn import LearnConfig, learn_guard
    from freezeasguard.protections.components import component_names

    model = build_tiny_model(TinySpec(), seed=0)
    xattn = component_names(model.unet, "freeze-cross-attention")
    with pytest.raises(ValueError, match="leaves the mask nothing to learn"):
        learn_guard(model, toy_data(2), toy_data(2), LearnConfig(ratio=0.01), always_frozen=xattn)
    with pytest.raises(ValueError, match="not UNet tensors"):
        learn_guard(model, toy_data(2), toy_data(2), LearnConfig(), always_frozen=["nope.weight"])


def test_the_simulated_attacker_can_be_drawn_from_optimizers_and_horizons(toy_data, tmp_path):
    """Per restart, a seeded draw of optimizer and horizon (within its bounds); the defaults restart every
    reset_every steps with AdamW, as before the draws existed."""
    from freezeasguard.protections.immunise import attacker_at_restart

    cfg = ImmuniseConfig(steps=40, reset_every=2, reset_every_max=8, batch_size=2, text_subspace=0,
                         attack_optimizers=("adamw", "sgd"))
    draws = [attacker_at_restart(cfg, 0, step) for step in range(40)]
    assert draws == [attacker_at_restart(cfg, 0, step) for step in range(40)]  # seeded
    assert {o for _, o, _ in draws} == {"adamw", "sgd"} and all(2 <= h <= 8 for _, _, h in draws)
    assert len({h for _, _, h in draws}) > 2
    assert {attacker_at_restart(ImmuniseConfig(), 0, s) for s in range(10)} == {(1e-4, "adamw", 25)}

    illegal, legal = toy_data(4), toy_data(4, random_flip=False)
    model = build_tiny_model(TinySpec(), seed=0)
    short = dataclasses.replace(cfg, steps=12)
    immunise_frozen(model, _frozen_names(model), illegal, legal, short, seed=0, output_dir=tmp_path, progress=False)
    history = json.loads((tmp_path / "immunise.json").read_text())["history"]
    restarts = [h["step"] - 1 for h in history if h["restarted"]]
    assert restarts[0] == 0
    for a, b in zip(restarts, restarts[1:]):  # each restart comes after its own drawn horizon
        assert b - a == attacker_at_restart(short, 0, a)[2]
    for h in history:
        start = max(r for r in restarts if r <= h["step"] - 1)
        assert h["attack_optimizer"] == attacker_at_restart(short, 0, start)[1]
    with pytest.raises(ValueError, match="attack_optimizers"):
        ImmuniseConfig(attack_optimizers=("adam-w",))
    with pytest.raises(ValueError, match="reset_every_max"):
        ImmuniseConfig(reset_every=25, reset_every_max=10)
    assert ImmuniseConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_an_attacker_that_diverges_restarts_and_never_reaches_the_values(toy_data, tmp_path):
    illegal, legal = toy_data(4), toy_data(4, random_flip=False)
    model = build_tiny_model(TinySpec(), seed=0)
    cfg = ImmuniseConfig(steps=6, reset_every=3, batch_size=2, text_subspace=0, attack_optimizers=("sgd",),
                         sgd_lr_scale=1e9)
    immunise_frozen(model, _frozen_names(model), illegal, legal, cfg, seed=0, output_dir=tmp_path, progress=False)
    history = json.loads((tmp_path / "immunise.json").read_text())["history"]
    assert any(h.get("diverged") for h in history)
    assert all(torch.isfinite(p).all() for p in model.unet.parameters())
    # with the path's clipping the same attacker stays finite at a sane scale
    clipped = dataclasses.replace(cfg, sgd_lr_scale=100.0, attack_max_grad_norm=1.0)
    immunise_frozen(build_tiny_model(TinySpec(), seed=0), _frozen_names(model), illegal, legal, clipped, seed=0,
                    output_dir=tmp_path / "clipped", progress=False)
    assert not any(h.get("diverged") for h in json.loads((tmp_path / "clipped" / "immunise.json").read_text())["history"])


def test_random_attacker_captions_never_use_a_publisher_word_and_are_seeded():
    import re

    from freezeasguard.protections.immunise import random_captions

    captions = ["a photo of a dancer", "a drawing of a dancer", "a photo of a judge"]
    forbidden = captions + ["a cat in the snow"]
    names = random_captions(captions, forbidden, seed=0, restart=0, words=2)
    assert set(names) == set(captions) and len(set(names.values())) == len(captions)
    publisher = {w for c in forbidden for w in re.findall(r"\w+", c)}
    for made_up in names.values():
        words = made_up.split()
        assert len(words) == 2 and not set(words) & publisher
        assert not any(w in " ".join(forbidden) for w in words)  # not even inside a publisher word
    assert names == random_captions(captions, forbidden, seed=0, restart=0, words=2)
    assert names != random_captions(captions, forbidden, seed=0, restart=25, words=2)  # new words per restart
    assert names != random_captions(captions, forbidden, seed=1, restart=0, words=2)


def test_an_attacker_on_random_captions_trains_on_them_and_moves_only_the_frozen_tensors(toy_data, tmp_path):
    from freezeasguard.protections.immunise import random_captions, recaptioned

    illegal, legal = toy_data(4), toy_data(4, random_flip=False)
    model = build_tiny_model(TinySpec(), seed=0)
    ill = _encoded(model, illegal)
    names = random_captions(ill.captions, ill.unique_captions, seed=0, restart=0, words=2)
    renamed = recaptioned(model, ill, names)
    for i in range(len(ill)):  # the same images under the new words, encoded by the model's text encoder
        a, b = ill.example(i, 5), renamed.example(i, 5)
        assert torch.equal(a["latent_mean"], b["latent_mean"]) and b["caption"] == names[a["caption"]]
        assert torch.equal(b["encoder_hidden_states"], model.encode_text([b["caption"]]).hidden[0].cpu())
    frozen = _frozen_names(model)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    cfg = ImmuniseConfig(steps=6, reset_every=3, batch_size=2, lr=1e-2, text_subspace=0, attack_captions="random")
    immunise_frozen(model, frozen, illegal, legal, cfg, seed=0, output_dir=tmp_path, progress=False)
    after = dict(model.unet.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= set(frozen)
    # the words matter: the same run on the publisher's captions releases other values
    given = build_tiny_model(TinySpec(), seed=0)
    immunise_frozen(given, frozen, illegal, legal, dataclasses.replace(cfg, attack_captions="given"), seed=0,
                    progress=False)
    assert any(not torch.equal(after[n], dict(given.unet.named_parameters())[n]) for n in frozen)
    with pytest.raises(ValueError, match="attack_captions"):
        ImmuniseConfig(attack_captions="renamed")


def test_the_unrolled_attackers_hypergradient_is_exact():
    """Through every unrolled step, against finite differences in float64 (torch.autograd.gradcheck), on a
    loss whose frozen value enters both the attacker's steps and the final loss."""
    from freezeasguard.protections.immunise import unrolled_loss

    torch.manual_seed(0)
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    batches = [torch.randn(4, dtype=torch.float64) for _ in range(3)]

    def outcome(v):
        def loss(theta, x):  # a smooth loss in the trainable theta and the frozen v
            w = theta["w"]
            return ((a @ (w * x)).tanh() ** 2).sum() + (v * w).sin().sum() + (w - v).pow(2).sum()

        return unrolled_loss(loss, {"w": b}, batches[:2], batches[2], lr=0.1)

    v = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(outcome, (v,), eps=1e-6, atol=1e-8, rtol=1e-6)
    # no step, no look-ahead: the loss at the start
    plain = unrolled_loss(lambda t, x: (t["w"] * x).sum(), {"w": b}, [], batches[2], lr=0.1)
    assert float(plain.detach()) == pytest.approx(float((b * batches[2]).sum()))


def test_an_unrolled_defender_moves_only_the_frozen_tensors_and_is_seeded(toy_data, tmp_path):
    illegal, legal = toy_data(4), toy_data(4, random_flip=False)
    cfg = ImmuniseConfig(steps=4, reset_every=2, batch_size=2, lr=1e-2, text_subspace=0, unroll_steps=2)
    runs = []
    for _ in range(2):
        model = build_tiny_model(TinySpec(), seed=0)
        before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
        frozen = _frozen_names(model)
        immunise_frozen(model, frozen, illegal, legal, cfg, seed=0, progress=False)
        after = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed and changed <= set(frozen)
        runs.append(after)
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])  # seeded: bit-identical
    first_order = build_tiny_model(TinySpec(), seed=0)
    immunise_frozen(first_order, frozen, illegal, legal, dataclasses.replace(cfg, unroll_steps=0), seed=0,
                    progress=False)
    assert any(not torch.equal(runs[0][n], dict(first_order.unet.named_parameters())[n]) for n in frozen)
    with pytest.raises(ValueError, match="unroll_steps"):
        ImmuniseConfig(unroll_steps=2, legal_at="user")


class _Stop(Exception):
    pass


@pytest.mark.parametrize("changes", [
    {},
    {"legal_at": "user"},
    {"attack_captions": "random", "attack_optimizers": ("adamw", "sgd"), "reset_every": 2, "reset_every_max": 5},
    {"unroll_steps": 2},
], ids=["attacked", "legal-user", "random-captions-sgd-horizons", "unrolled"])
def test_an_interrupted_immunisation_resumes_bit_identically(changes, toy_data, tmp_path):
    illegal, legal = toy_data(4), toy_data(4, random_flip=False)
    cfg = dataclasses.replace(ImmuniseConfig(steps=6, reset_every=3, batch_size=2, lr=1e-2, text_subspace=0),
                              **changes)

    def run(out, on_checkpoint=None, perturb=False):
        model = build_tiny_model(TinySpec(), seed=0)
        frozen = _frozen_names(model)
        try:
            immunise_frozen(model, frozen, illegal, legal, cfg, seed=2, output_dir=out, progress=False,
                            checkpoint_every=2, on_checkpoint=on_checkpoint)
        except _Stop:
            return None
        return {n: p.detach().clone() for n, p in model.unet.named_parameters()}

    reference = run(tmp_path / "straight")

    def stop_at_4(step):
        if step == 4:
            raise _Stop

    assert run(tmp_path / "run", stop_at_4) is None
    state = json.loads((tmp_path / "run" / "immunise-checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and len(state["history"]) == 4
    resumed = run(tmp_path / "run")
    assert all(torch.equal(reference[n], resumed[n]) for n in reference)  # values and the restored rest
    straight = json.loads((tmp_path / "straight" / "immunise.json").read_text())
    again = json.loads((tmp_path / "run" / "immunise.json").read_text())
    assert again["history"] == straight["history"]
    assert not (tmp_path / "run" / "immunise-checkpoint").exists()  # removed once the release is recorded


def test_a_checkpoint_of_another_immunisation_is_refused(toy_data, tmp_path):
    illegal, legal = toy_data(4), toy_data(4, random_flip=False)
    cfg = ImmuniseConfig(steps=6, reset_every=3, batch_size=2, lr=1e-2, text_subspace=0)

    def stop(step):
        raise _Stop

    model = build_tiny_model(TinySpec(), seed=0)
    with pytest.raises(_Stop):
        immunise_frozen(model, _frozen_names(model), illegal, legal, cfg, seed=2, output_dir=tmp_path,
                        progress=False, checkpoint_every=2, on_checkpoint=stop)
    model = build_tiny_model(TinySpec(), seed=0)
    with pytest.raises(ValueError, match="another immunisation.*config"):
        immunise_frozen(model, _frozen_names(model), illegal, legal, dataclasses.replace(cfg, lr=2e-2), seed=2,
                        output_dir=tmp_path, progress=False, checkpoint_every=2)
    other = build_tiny_model(TinySpec(), seed=1)  # another model: its released values differ
    with pytest.raises(ValueError, match="origins_sha256"):
        immunise_frozen(other, _frozen_names(model), illegal, legal, cfg, seed=2, output_dir=tmp_path,
                        progress=False, checkpoint_every=2)
    (tmp_path / "immunise-checkpoint" / "state.safetensors").write_bytes(b"\0" * 10)
    model = build_tiny_model(TinySpec(), seed=0)
    with pytest.raises(ValueError, match="unreadable checkpoint"):
        immunise_frozen(model, _frozen_names(model), illegal, legal, cfg, seed=2, output_dir=tmp_path,
                        progress=False, checkpoint_every=2)
    from freezeasguard.protections.immunise import discard_other_checkpoint

    assert not discard_other_checkpoint(tmp_path, cfg)  # its own recipe's checkpoint is kept
    assert discard_other_checkpoint(tmp_path, dataclasses.replace(cfg, lr=2e-2))
    assert not (tmp_path / "immunise-checkpoint").exists()
