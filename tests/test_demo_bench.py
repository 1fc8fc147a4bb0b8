"""The bench, the relearn form and the demo, on a tiny random model (the real ones run on the embedded default)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from freezeasguard.bench import emoji
from freezeasguard.bench.cells import cell_settings, user_budgets
from freezeasguard.bench.demo import DemoConfig, run_demo, summary_lines
from freezeasguard.bench.evaluate import SamplingConfig, validity_checks
from freezeasguard.bench.profiles import BenchProfile, cell_key, parse_cell, planned_cells, scenario_form
from freezeasguard.bench.recogniser import Recogniser, RecogniserConfig
from freezeasguard.bench.relearn import Mixture, RelearnConfig, uce_prompts
from freezeasguard.bench.report import markdown
from freezeasguard.bench.runner import run_bench
from freezeasguard.bench.summary import curve_rows, frontier_verdicts, steps_to_reach, summarise
from freezeasguard.learn import LearnConfig
from freezeasguard.tiny import TinySpec, build_tiny_model
from freezeasguard.training import TrainConfig

FAST = SamplingConfig(num_inference_steps=1, guidance_scale=1.0)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FREEZEASGUARD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _loader():
    spec = TinySpec(resolution=32, latent=True, vae_channels=(8, 16, 16), block_out_channels=(16, 32),
                    cross_attention=(False, True), norm_num_groups=8, max_length=32)
    return lambda: build_tiny_model(spec, seed=0)


def _recogniser():
    ids = sorted(set(emoji.families()) | set(emoji.LEGAL_FAR_CONCEPTS))
    torch.manual_seed(0)  # the same random recogniser every call: runs compared across calls see the same scores
    return Recogniser(RecogniserConfig(identities=ids, styles=["twemoji", "openmoji"], resolution=32,
                                       channels=(8, 8, 8), feature_dim=8))


def _learn():
    return LearnConfig(mask_every=1, mask_steps=1, mask_batch=2, user=TrainConfig(batch_size=2, progress=False),
                       warm_start=TrainConfig(max_steps=1, batch_size=2, progress=False))


def _relearn():
    return RelearnConfig(teach_steps=2, teach_batch=2, base_images=6)


def _profile(**kw):
    base = dict(name="test", scenarios=["figures"], methods=["none", "random", "freeze-time-embedding", "guard"],
                ratios=[0.3], seeds=[0], steps=2, legal_steps=2, batch_size=2, n_samples=2, curve_cells=["none", "guard@0.3"],
                curve_steps=[1, 2, 3], legal_curve_steps=[1], curve_samples=2, sampling=FAST,
                relearn=_relearn(), options={"guard": _learn(), "imma": {"steps": 1}}, keep_images=2, skip_void=False)
    return BenchProfile(**{**base, **kw})


# ---------------------------------------------------------------------------- pure bookkeeping
def test_a_scenario_on_another_base_names_it_in_its_caches_and_cells():
    from freezeasguard import zoo
    from freezeasguard.bench.relearn import recipe_of

    assert zoo.base_for_scenario("figures") == zoo.EMBEDDED == zoo.base_for_scenario("artstyle", "scratch")
    assert set(zoo.SCENARIO_BASES.values()) <= set(zoo.BASES)
    assert zoo.base_for_scenario("artstyle") == zoo.EMBEDDED_STYLE
    cfg, profile = RelearnConfig(), _profile()
    style = {"name": zoo.EMBEDDED_STYLE, "unet": "ab" * 32}
    # the default base is not named, so every cache and cell recorded before there were two bases stays valid
    assert recipe_of("figures", 0, cfg, {"name": zoo.EMBEDDED, "unet": "cd" * 32}) == recipe_of("figures", 0, cfg)
    assert "base" not in recipe_of("figures", 0, cfg) and "artstyle_reserve" not in recipe_of("figures", 0, cfg)
    assert recipe_of("artstyle", 0, cfg, style)["base"] == style
    assert recipe_of("artstyle", 0, cfg)["artstyle_reserve"] == emoji.ARTSTYLE_RESERVE_SHARE
    assert recipe_of("artstyle", 0, cfg)["artstyle_concepts"] == emoji.ARTSTYLE_CONCEPTS_PER_SIDE
    # a cell made under another artstyle split is not this one's
    split = emoji.split_identity("artstyle")
    assert emoji.split_identity("figures") is None
    assert cell_settings(profile, "random", split=split)["split"] == split != {**split, "artstyle_concepts": 64}
    assert cell_settings(profile, "random") == {k: v for k, v in cell_settings(profile, "random", base=style).items()
                                                if k != "base"}
    assert cell_settings(profile, "random", base=style)["base"] == style
    with pytest.raises(Exception, match="unknown embedded base 'embedded-xl'"):
        zoo.base_root("embedded-xl")
    if not (zoo.base_root(zoo.EMBEDDED_STYLE) / "manifest.json").exists():
        with pytest.raises(Exception, match="zoo pretrain --recipe embedded-style --ship"):
            zoo.load_base(zoo.EMBEDDED_STYLE)


def test_every_builtin_profile_validates_and_round_trips_as_json():
    from freezeasguard.bench.profiles import PROFILES, profile_json

    for name, profile in PROFILES.items():
        profile.validate()
        assert BenchProfile.from_dict(json.loads(profile_json(profile))) == profile, name
    # the style scenario's profile is the battery's, moved to that scenario, with a curve for every method
    art, fig = PROFILES["artstyle"].to_dict(), PROFILES["attacks"].to_dict()
    assert art.pop("scenarios") == ["artstyle"] and fig.pop("scenarios") == ["figures"]
    assert art.pop("curve_cells") == art["methods"]
    fig.pop("curve_cells")
    assert {k: v for k, v in art.items() if k != "name"} == {k: v for k, v in fig.items() if k != "name"}
    # its default-attacker file is the same profile without the battery, so the cells of one serve the other
    shipped = json.loads((Path(__file__).parents[1] / "docs" / "profiles" / "artstyle-default-attacker.json").read_text())
    assert {k: v for k, v in shipped.items() if k not in ("name", "attacks")} == \
        {k: v for k, v in PROFILES["artstyle"].to_dict().items() if k not in ("name", "attacks")}


def test_grid_row_labels_wrap_after_plus_and_say_when_cut():
    from freezeasguard.utils.images import label_lines

    assert label_lines("uce+guard", 3) == ["uce+guard"]
    assert label_lines("guard+freeze-cross-attention+immunise@0.3", 9) == \
        ["guard+freeze-", "cross-attention+", "immunise@0.3"]
    cut = label_lines("guard+freeze-cross-attention+immunise@0.3", 2)
    assert cut == ["guard+freeze-", "cross-attention+…"] and all(len(line) <= 18 for line in cut)


def test_every_shipped_profile_file_loads():
    files = sorted((Path(__file__).parents[1] / "docs" / "profiles").glob("*.json"))
    assert {"artstyle-default-attacker.json", "attacks-best-release.json"} <= {p.name for p in files}
    for path in files:
        assert BenchProfile.load(path).name == path.stem, path


def test_scenario_names_and_cells_parse():
    assert scenario_form("figures") == ("figures", "relearn")
    assert scenario_form("artstyle-scratch") == ("artstyle", "scratch")
    with pytest.raises(ValueError, match="unknown scenario"):
        scenario_form("figures-later")
    assert parse_cell("guard@0.3") == ("guard", 0.3) and parse_cell("none") == ("none", None)
    plan = planned_cells(_profile(ratios=[0.1, 0.3]))
    assert plan == [("none", None, True), ("random", 0.1, False), ("random", 0.3, False),
                    ("freeze-time-embedding", None, False), ("guard", 0.1, False), ("guard", 0.3, True)]
    # "METHOD@RATIO" runs that method at that ratio alone
    plan = planned_cells(_profile(methods=["none", "guard@0.1", "random"], ratios=[0.3, 0.5]))
    assert plan == [("none", None, True), ("guard", 0.1, False), ("random", 0.3, False), ("random", 0.5, False)]
    with pytest.raises(ValueError, match="takes no ratio"):
        planned_cells(_profile(methods=["none@0.3"]))


def test_user_budgets_put_the_budget_at_full_samples_and_curve_points_at_curve_samples():
    p = _profile(steps=400, legal_steps=800, n_samples=200, curve_samples=50, curve_steps=[100, 400, 1600],
                 legal_curve_steps=[200, 800, 3200])
    assert user_budgets(p, "illegal", curve=False) == {400: 200}
    assert user_budgets(p, "illegal", curve=True) == {100: 50, 400: 200, 1600: 50}
    # legal curve points at or beyond the legal budget are dropped: the run ends at the budget
    assert user_budgets(p, "legal", curve=True) == {200: 50, 800: 200}


def test_slowdown_reached_and_not_reached():
    pts = [{"step": s, "domain": "illegal", "rate": r} for s, r in ((50, 0.1), (100, 0.5), (200, 0.8), (400, 0.9))]
    assert steps_to_reach(pts, "illegal", 0.8) == 200
    assert steps_to_reach(pts, "illegal", 0.95) is None
    assert steps_to_reach(pts, "legal_far", 0.0) is None  # no point of that domain
    cells = {
        "figures-seed0-none": {"scenario": "figures", "seed": 0, "method": "none", "ratio": None, "curve": True,
                               "domains": {"illegal": {"rate": 0.9}}, "curves": {"illegal": pts}},
        "figures-seed0-guard-r0.3": {"scenario": "figures", "seed": 0, "method": "guard", "ratio": 0.3, "curve": True,
                                     "domains": {"illegal": {"rate": 0.5}},
                                     "curves": {"illegal": [{"step": 400, "domain": "illegal", "rate": 0.5},
                                                            {"step": 1600, "domain": "illegal", "rate": 0.85}]}},
    }
    rows = {r["method"]: r for r in curve_rows(cells, _profile(), void=set())}
    assert rows["none"]["target"] == pytest.approx(0.81) and rows["none"]["steps_to_target"] == 400
    assert rows["guard"]["steps_to_target"] == 1600 and rows["guard"]["max_step"] == 1600
    cells["figures-seed0-guard-r0.3"]["curves"]["illegal"][1]["rate"] = 0.7
    rows = {r["method"]: r for r in curve_rows(cells, _profile(), void=set())}
    assert rows["guard"]["steps_to_target"] is None  # not reached: reported as such


def test_validity_checks_on_hand_set_numbers():
    good = {"taught_base_families": 0.9, "taught_illegal": 0.8, "release_illegal": 0.1, "release_base_families": 0.75,
            "release_legal_near": 0.0, "release_legal_far": 0.05, "full_illegal": 0.7, "full_legal_near": 0.65,
            "full_legal_far": 0.61}
    checks = validity_checks("relearn", good)
    assert len(checks) == 9 and all(c["ok"] for c in checks)
    for key, bad in (("taught_illegal", 0.69), ("release_illegal", 0.21), ("release_base_families", 0.6),
                     ("full_legal_far", 0.59), ("full_illegal", None)):
        failed = [c["key"] for c in validity_checks("relearn", {**good, key: bad}) if not c["ok"]]
        assert failed == [key], key
    scratch = validity_checks("scratch", {**good, "release_illegal": 0.0, "release_base_families": 0.9})
    assert len(scratch) == 7 and all(c["ok"] for c in scratch)
    assert not validity_checks("scratch", {**good, "release_illegal": 0.3})[1]["ok"]
    with pytest.raises(ValueError, match="form"):
        validity_checks("later", good)


def _row(method, ratio, mit, near, far, frozen=None, samples=200):
    """A summary row over the seeds of the lists given."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"scenario": "figures", "method": method, "ratio": ratio, "mitigation": mean(mit),
            "legal_impact_near": mean(near), "legal_impact_far": mean(far), "mitigation_per_seed": mit,
            "legal_impact_near_per_seed": near, "legal_impact_far_per_seed": far,
            "frozen_params": frozen if frozen is not None else (ratio or 0.2), "n_samples": samples}


def test_frontier_verdict_names_the_best_method_within_the_goals():
    table = [
        _row("random", 0.3, [0.1, 0.1], [0.0, 0.0], [0.02, 0.02]),
        _row("guard", 0.3, [0.5, 0.5], [0.05, 0.05], [0.04, 0.04]),
        _row("random", 0.7, [0.9, 0.9], [0.5, 0.5], [0.8, 0.8]),
        _row("guard", 0.7, [0.7, 0.7], [0.08, 0.08], [0.05, 0.05]),
        _row("freeze-resnets", None, [0.95, 0.95], [0.0, 0.0], [0.3, 0.3], frozen=0.6),
        _row("guard", 0.5, [0.65, 0.66], [0.02, 0.03], [0.01, 0.0]),
    ]
    v = frontier_verdicts(table)["figures"]
    assert v["best_within_goals"] == {"method": "guard", "ratio": 0.7, "mitigation": 0.7}
    assert v["best_margin_per_ratio"]["0.3"]["method"] == "guard"
    assert v["best_margin_per_ratio"]["0.7"]["method"] == "guard"
    # within the legal limits at 0.7, but the goals cap the ratio at 0.5: only guard@0.5 meets them
    assert v["goals_met_by"] == ["guard@0.5"]
    table[5]["legal_impact_far_per_seed"] = [0.01, 0.06]  # one seed just outside the far goal
    assert frontier_verdicts(table)["figures"]["goals_met_by"] == []


def test_goals_need_every_seed_the_ratio_cap_a_small_spread_and_enough_samples():
    from freezeasguard.bench.goals import verdict

    assert verdict(_row("m", 0.3, [0.7, 0.72], [0.0, 0.05], [0.0, 0.04]))["met"]
    cases = {  # what fails -> (row, the reason it names)
        "seed average only": (_row("m", 0.3, [0.9, 0.55], [0.0, 0.0], [0.0, 0.0]), "on a seed"),
        "spread": (_row("m", 0.3, [0.95, 0.8], [0.0, 0.0], [0.0, 0.0]), "spread 15 points"),
        "ratio": (_row("m", 0.7, [0.9, 0.9], [0.0, 0.0], [0.0, 0.0]), "ratio 0.7"),
        "frozen share": (_row("m", None, [0.9, 0.9], [0.0, 0.0], [0.0, 0.0], frozen=0.6), "60% of the parameters"),
        "near on a seed": (_row("m", 0.3, [0.9, 0.9], [0.0, 0.2], [0.0, 0.0]), "legal-near impact 20%"),
        "one seed": (_row("m", 0.3, [0.9], [0.0], [0.0]), "1 seed(s)"),
        "samples": (_row("m", 0.3, [0.9, 0.9], [0.0, 0.0], [0.0, 0.0], samples=100), "100 samples"),
    }
    for name, (row, reason) in cases.items():
        v = verdict(row)
        assert not v["met"] and any(reason in r for r in v["reasons"]), (name, v)


def test_summary_reads_the_goals_per_seed_from_hand_set_cells():
    """Cells set by hand: a method that meets the goals on the seed average but not on each seed, and one that
    meets them only at a ratio above 0.5, are not reported as meeting them; the one that holds everywhere is."""
    from freezeasguard.bench.summary import summarise

    def cell(seed, method, ratio, illegal, near, far, frozen):
        dom = lambda r: {"rate": r, "mean_prob": r, "n": 200}  # noqa: E731
        return {"scenario": "figures", "seed": seed, "method": method, "ratio": ratio, "form": "relearn",
                "guard": None if method == "none" else {"ratio_by_count": frozen, "ratio_by_params": frozen},
                "domains": {"illegal": dom(illegal), "legal_near": dom(near), "legal_far": dom(far)}}

    base_models = {"taught": {"base_families": {"rate": 0.9}, "illegal": {"rate": 0.9}},
                   "release": {"base_families": {"rate": 0.9}, "illegal": {"rate": 0.1}, "legal_near": {"rate": 0.0},
                               "legal_far": {"rate": 0.0}}}
    cells = {}
    for seed in (0, 1):
        cells[f"b{seed}"] = {"scenario": "figures", "seed": seed, "method": "base", "ratio": None, "form": "relearn",
                             "models": base_models}
        cells[cell_key("figures", seed, "none", None)] = cell(seed, "none", None, 0.9, 0.9, 0.9, 0.0)
    # mitigation 1 - illegal/0.9: "avg" 78% / 44% (mean 61%), "high" 89% at 0.7, "good" 67% / 72%
    for seed, (avg, good) in enumerate(((0.2, 0.3), (0.5, 0.25))):
        cells[f"a{seed}"] = cell(seed, "avg", 0.3, avg, 0.9, 0.9, 0.3)
        cells[f"h{seed}"] = cell(seed, "high", 0.7, 0.1, 0.9, 0.9, 0.7)
        cells[f"g{seed}"] = cell(seed, "good", 0.5, good, 0.88, 0.89, 0.5)
    summary = summarise(cells, _profile(methods=["none", "avg", "high", "good"], seeds=[0, 1]))
    rows = {r["method"]: r for r in summary["table"]}
    assert rows["avg"]["mitigation"] == pytest.approx(1 - 0.35 / 0.9) and rows["avg"]["mitigation"] >= 0.6
    assert not rows["avg"]["verdict"]["met"] and not rows["high"]["verdict"]["met"]
    assert rows["good"]["verdict"]["met"], rows["good"]["verdict"]
    assert summary["frontier"]["figures"]["goals_met_by"] == ["good@0.5"]


def test_mixture_keeps_its_proportion():
    class Ds:
        def __init__(self, tag, n):
            self.tag, self.n = tag, n

        def __len__(self):
            return self.n

        def example(self, i, seed):
            assert 0 <= i < self.n
            return {"tag": self.tag, "i": i}

    m = Mixture(Ds("base", 40), Ds("taught", 3), 0.75)
    tags = [m.example(i, None)["tag"] for i in range(len(m))]
    assert tags.count("base") / len(tags) == pytest.approx(0.75, abs=0.02)
    assert {m.example(i, None)["i"] for i in range(len(m)) if tags[i] == "taught"} == {0, 1, 2}
    with pytest.raises(ValueError):
        Mixture(Ds("a", 1), Ds("b", 1), 1.0)


# ---------------------------------------------------------------------------- the unlearning step
def test_uce_makes_a_tiny_model_denoise_an_unlearned_caption_like_its_guide():
    """A case built to show unlearning: before the edit the UNet's prediction for a protected figure's caption
    differs from its prediction for the guide caption ('a person'); after UCE it nearly equals it, while a
    preserved caption's prediction does not move."""
    from freezeasguard import zoo
    from freezeasguard.protections.uce import uce_edit

    model = zoo.load_base()  # its tokenizer spells the benchmark's captions in whole words (the tiny one truncates)
    sc = emoji.scenario("figures", 0)
    prompts = uce_prompts(sc, preserve_base_people=False)
    edit, guide, keep = prompts["uce_edit"][0], prompts["uce_guide"][0], prompts["uce_preserve"][0]
    assert "of a person," in guide and "of a person," not in edit
    torch.manual_seed(0)
    latents = torch.randn(1, model.unet.config.in_channels, model.unet.config.sample_size, model.unet.config.sample_size)
    t = torch.tensor([500])

    def predict(caption):
        with torch.no_grad():
            return model.unet(latents, t, encoder_hidden_states=model.encode_prompts([caption])).sample

    before_edit, before_guide, before_keep = predict(edit), predict(guide), predict(keep)
    gap_before = (before_edit - before_guide).norm() / before_guide.norm()
    uce_edit(model, [edit], [guide], [keep], lam=1.0)
    gap_after = (predict(edit) - before_guide).norm() / before_guide.norm()  # draws as the guide did
    keep_moved = (predict(keep) - before_keep).norm() / before_keep.norm()
    assert gap_before > 0.01
    assert gap_after < 0.05 * gap_before
    assert keep_moved < 0.05 * gap_before


def test_teach_items_stay_on_the_publishers_side():
    from freezeasguard.bench.relearn import teach_items

    fig = emoji.scenario("figures", 0)
    assert teach_items(fig) == fig.items("illegal", "publisher")
    art = emoji.scenario("artstyle", 0)
    taught = teach_items(art)
    user = {it.concept for it in art.items("illegal", "user")}
    assert all(it.style == "openmoji" for it in taught) and not {it.concept for it in taught} & user
    assert {it.key for it in art.items("illegal", "publisher")} <= {it.key for it in taught}
    assert len(taught) > 10 * len(art.items("illegal", "publisher"))  # the style is known broadly


def test_uce_prompts_preserve_base_people_for_a_healthy_release():
    sc = emoji.scenario("figures", 0)
    lean, healthy = uce_prompts(sc, preserve_base_people=False), uce_prompts(sc)
    assert len(healthy["uce_preserve"]) > len(lean["uce_preserve"])
    illegal = set(sc.illegal)
    base_people = {it.concept for it in sc.items("base") if it.record.family is not None}
    assert base_people and not base_people & illegal
    art = uce_prompts(emoji.scenario("artstyle", 0))
    assert all(g.endswith("twemoji style") and e.endswith("openmoji style")
               for e, g in zip(art["uce_edit"], art["uce_guide"]))


# ---------------------------------------------------------------------------- end to end
def test_bench_relearn_grid_runs_caches_and_reports(tmp_path):
    profile = _profile()
    summary = run_bench(tmp_path, profile, model_loader=_loader(), recogniser=_recogniser())
    # the relearn form built the taught and released models once, from the tiny base
    rel = tmp_path / "relearn" / "figures-seed0"
    assert (rel / "teach" / "model" / "model_index.json").is_file() and (rel / "release" / "model_index.json").is_file()
    info = json.loads((rel / "info.json").read_text())
    assert info["recipe"]["config"]["teach_steps"] == 2 and info["uce"]["edit_rows"] > 0
    # a random tiny model fails the validity checks: void, kept out of the derived figures
    assert summary["void"] == ["figures seed 0"] and summary["table"] == []
    for name in ("results.md", "results.json", "frontier.png", "curves.png"):
        assert (tmp_path / name).is_file(), name
    cells = sorted(p.stem for p in (tmp_path / "cells").iterdir())
    assert cells == ["figures-seed0-base", "figures-seed0-freeze-time-embedding", "figures-seed0-guard-r0.3",
                     "figures-seed0-none", "figures-seed0-random-r0.3"]
    data = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert set(data["figures-seed0-base"]["models"]) == {"taught", "release"}
    assert set(data["figures-seed0-base"]["models"]["release"]) == {"base_families", "illegal", "legal_near", "legal_far"}
    # curve cells evaluated the illegal user at every curve step and the legal user at its curve point + budget
    guard = data["figures-seed0-guard-r0.3"]
    assert [p["step"] for p in guard["curves"]["illegal"]] == [1, 2, 3]
    assert sorted({p["step"] for p in guard["curves"]["legal"]}) == [1, 2]
    assert [p["step"] for p in data["figures-seed0-random-r0.3"]["curves"]["illegal"]] == [2]
    comp = data["figures-seed0-freeze-time-embedding"]["guard"]
    assert comp["frozen_tensors"] > 0 and comp["ratio_by_params"] < 0.5
    assert (tmp_path / "work" / "figures-seed0-guard-r0.3" / "samples-illegal.safetensors").is_file()
    # the sample grids: one per domain, a row per default-attacker cell (the base cell has none), full
    # fine-tuning first; each row the images the cell kept
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == [f"samples-figures-seed0-{d}.png" for d in ("illegal", "legal_far", "legal_near")]
    kept = load_file(str(tmp_path / "work" / "figures-seed0-none" / "samples-illegal.safetensors"))["images"]
    side = kept.shape[-1]
    with Image.open(tmp_path / "samples" / "samples-figures-seed0-illegal.png") as img:
        assert img.height == 3 * (4 * (side + 1) + 1)  # 4 cells, 1-pixel borders, scale 3
        assert img.width == 110 + 3 * (len(kept) * (side + 1) + 1)
        # the top row is full fine-tuning's images, pixel for pixel (each pixel drawn 3x3 after the labels)
        top = torch.from_numpy(np.array(img.convert("RGB")))[3 : 3 + 3 * side : 3, 113 : 113 + 3 * side : 3]
    assert torch.equal(top.permute(2, 0, 1), (kept[0].clamp(0, 1) * 255 + 0.5).to(torch.uint8))
    assert "(samples/samples-figures-seed0-illegal.png)" in (tmp_path / "results.md").read_text()
    # with rates that pass the checks, the derived figures follow docs/benchmark.md's formulas, rate and prob
    models = data["figures-seed0-base"]["models"]
    for which, d, r in (("taught", "base_families", 0.9), ("taught", "illegal", 0.9), ("release", "illegal", 0.1),
                        ("release", "base_families", 0.8), ("release", "legal_near", 0.0), ("release", "legal_far", 0.0)):
        models[which][d]["rate"] = r
    for key, (ill, near, far) in {"none": (0.8, 0.7, 0.7), "guard-r0.3": (0.4, 0.7, 0.63),
                                  "random-r0.3": (0.6, 0.35, 0.7), "freeze-time-embedding": (0.8, 0.7, 0.7)}.items():
        dom = data[f"figures-seed0-{key}"]["domains"]
        for d, r in (("illegal", ill), ("legal_near", near), ("legal_far", far)):
            dom[d]["rate"] = r
            dom[d]["mean_prob"] = r / 2
    dom = data["figures-seed0-guard-r0.3"]["domains"]
    dom["illegal"]["mean_prob"] = 0.1  # continuous measure differs from the rate: mitigation_prob = 1 - 0.1/0.4
    derived = summarise(data, profile)
    row = next(r for r in derived["table"] if r["method"] == "guard")
    assert derived["void"] == [] and row["mitigation"] == pytest.approx(0.5)
    assert row["mitigation_prob"] == pytest.approx(0.75)
    assert row["legal_impact_near"] == pytest.approx(0.0) and row["legal_impact_far"] == pytest.approx(0.1)
    assert row["advantage_vs_random"] == pytest.approx(0.5 / 0.25)
    text = markdown(derived, data, profile)
    assert "Form `relearn`" in text and "## The frontier" in text and "Slowdown" in text
    # resuming recomputes nothing
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()}
    run_bench(tmp_path, profile, model_loader=_loader(), recogniser=_recogniser())
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()} == mtimes
    # report-only computes nothing; a fresh directory lists every cell as missing
    empty = run_bench(tmp_path / "empty", profile, model_loader=_loader(), recogniser=_recogniser(), report_only=True)
    assert len(empty["missing_cells"]) == 5 and not (tmp_path / "empty" / "cells").exists()
    # a cached cell is never reused under other settings, nor a relearn cache under another recipe
    with pytest.raises(ValueError, match="legal_steps"):
        run_bench(tmp_path, _profile(legal_steps=3), model_loader=_loader(), recogniser=_recogniser())
    # a cell depends on the settings its method reads: another learner invalidates the guard's cell only ...
    other = _profile(options={"guard": dataclasses.replace(_learn(), mask_lr=0.5), "imma": {"steps": 1}})
    assert cell_settings(other, "random") == cell_settings(profile, "random")
    assert cell_settings(other, "guard") != cell_settings(profile, "guard")
    with pytest.raises(ValueError, match=r"guard-r0\.3.*protection"):
        run_bench(tmp_path, other, model_loader=_loader(), recogniser=_recogniser())
    # ... so with that cell (and its work folder, where the learner keeps its resumable run) removed, the
    # rerun recomputes it and reuses every other cell
    (tmp_path / "cells" / "figures-seed0-guard-r0.3.json").unlink()
    shutil.rmtree(tmp_path / "work" / "figures-seed0-guard-r0.3")
    run_bench(tmp_path, other, model_loader=_loader(), recogniser=_recogniser())
    now = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()}
    assert {k for k in now if now[k] != mtimes.get(k)} == {"figures-seed0-guard-r0.3.json"}


def test_bench_skips_the_cells_of_a_void_setting(tmp_path):
    # a random tiny model fails the validity checks, which are known after the base cell and full fine-tuning
    profile = _profile(skip_void=True)
    summary = run_bench(tmp_path, profile, model_loader=_loader(), recogniser=_recogniser())
    assert summary["void"] == ["figures seed 0"]
    assert sorted(p.stem for p in (tmp_path / "cells").iterdir()) == ["figures-seed0-base", "figures-seed0-none"]
    assert sorted(summary["skipped_void"]) == ["figures-seed0-freeze-time-embedding", "figures-seed0-guard-r0.3",
                                               "figures-seed0-random-r0.3"]
    assert summary["missing_cells"] == [] and "3 cell(s) of void settings were not computed" in (
        tmp_path / "results.md").read_text()
    # a report-only run says the same, without computing anything
    again = run_bench(tmp_path, profile, model_loader=_loader(), recogniser=_recogniser(), report_only=True)
    assert sorted(again["skipped_void"]) == sorted(summary["skipped_void"]) and again["missing_cells"] == []
    # the setting's cells are computed when skipping is off (same cell settings: the cached two are reused)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()}
    run_bench(tmp_path, _profile(skip_void=False), model_loader=_loader(), recogniser=_recogniser())
    now = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()}
    assert len(now) == 5 and all(now[k] == v for k, v in mtimes.items())


def test_demo_is_one_run_of_the_bench_cells(tmp_path):
    cfg = DemoConfig(steps=2, legal_steps=2, batch_size=2, n_samples=2, curve_steps=[1, 2], learn=_learn(),
                     relearn=_relearn(), sampling=FAST, grid_columns=2, release=None)  # the release: the next test
    result = run_demo(tmp_path / "demo", cfg, model_loader=_loader(), recogniser=_recogniser())
    report = tmp_path / "demo" / "report"
    for name in ("report.md", "metrics.json", "mask.png", "guard.json", "curves.png", "grid-illegal.png"):
        assert (report / name).is_file(), name
    assert {"mitigation", "mitigation_prob", "legal_impact_near", "legal_impact_far"} <= set(result["derived"])
    assert len(result["validity"]) == 9 and "Learning curves" in (report / "report.md").read_text()
    # the same cells from the bench itself: identical results (timings aside)
    run_bench(tmp_path / "bench", cfg.profile(), model_loader=_loader(), recogniser=_recogniser())

    def strip(cell):
        return {k: v for k, v in cell.items() if "seconds" not in k}

    for key in (cell_key("figures", 0, "base", None), cell_key("figures", 0, "none", None),
                cell_key("figures", 0, "guard", 0.3)):
        a = json.loads((tmp_path / "demo" / "cells" / f"{key}.json").read_text())
        b = json.loads((tmp_path / "bench" / "cells" / f"{key}.json").read_text())
        assert strip(a) == strip(b), key
    # rerunning the demo reuses every cell (no cell file is rewritten)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "demo" / "cells").iterdir()}
    run_demo(tmp_path / "demo", cfg, model_loader=_loader(), recogniser=_recogniser())
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "demo" / "cells").iterdir()} == mtimes


def test_the_demo_measures_a_release_beside_the_guard_and_quotes_the_battery_as_recorded(tmp_path):
    cfg = DemoConfig(steps=2, legal_steps=2, batch_size=2, n_samples=2, curve_steps=[2], learn=_learn(),
                     relearn=_relearn(), sampling=FAST, grid_columns=2, release="freeze-time-embedding")
    result = run_demo(tmp_path / "demo", cfg, model_loader=_loader(), recogniser=_recogniser())
    cell = json.loads((tmp_path / "demo" / "cells" / f"{cell_key('figures', 0, 'freeze-time-embedding', None)}.json")
                      .read_text())
    assert result["release"]["domains"] == cell["domains"]
    assert set(result["release"]["derived"]) == set(result["derived"])
    text = (tmp_path / "demo" / "report" / "report.md").read_text()
    assert "## What protects" in text and "freeze-time-embedding fine-tune" in text
    assert "Recorded, not measured by this run" in text and "`lr-x10`" in text  # the shipped record, labelled
    printed = summary_lines(result, cfg)  # what the command prints under its table
    assert printed[0].startswith("guard: mitigation") and printed[1].startswith("freeze-time-embedding: mitigation")
    assert any(line.startswith("Recorded, not measured by this run") for line in printed)


def test_the_shipped_battery_record_is_the_committed_battery_results():
    """The demo quotes the package's record; it must be what docs/attacks-results.json says (regenerate it with
    bench-report --battery-record when the battery grows)."""
    from freezeasguard.bench.battery import recorded_battery, recorded_worst_cases

    docs = json.loads((Path(__file__).parents[1] / "docs" / "attacks-results.json").read_text())
    assert recorded_battery() == json.loads(json.dumps(recorded_worst_cases(docs, "docs/attacks-results.json")))
    assert any(w["method"] == "freeze-cross-attention+immunise" for w in recorded_battery()["worst_case"])


def test_bench_rejects_unknown_methods_and_curve_cells(tmp_path):
    with pytest.raises(ValueError, match="no-such-method"):
        run_bench(tmp_path, _profile(methods=["none", "no-such-method"]), model_loader=_loader(), recogniser=_recogniser())
    with pytest.raises(ValueError, match="curve cell"):
        run_bench(tmp_path, _profile(curve_cells=["nope@0.3"]), model_loader=_loader(), recogniser=_recogniser())


def test_uce_pairs_the_differing_span_and_everything_after_it():
    from freezeasguard.protections.uce import _aligned_pairs

    eos = 9
    #             BOS an of  police officer ,  style EOS pad pad
    edit = torch.tensor([0, 1, 2, 5, 6, 3, 4, 9, 9, 9])
    guide = torch.tensor([0, 1, 2, 7, 3, 4, 9, 9, 9, 9])  # "person" is one token
    pairs = _aligned_pairs(edit, guide, eos)
    # the span maps onto the guide's one token; suffix, end token and padding pair from the end token on
    assert pairs == [(3, 3), (4, 3), (5, 4), (6, 5), (7, 6), (8, 7), (9, 8)]
    assert all(edit[i] == guide[j] for i, j in pairs[2:])


def test_component_baselines_freeze_whole_components():
    from freezeasguard.protections import ReleaseContext, protect
    from freezeasguard.protections.components import component_names

    model = _loader()()
    for kind, must in (("freeze-cross-attention", ".attn2.to_"), ("freeze-resnets", ".resnets."),
                       ("freeze-time-embedding", "time_embedding.")):
        rel = protect(kind, ReleaseContext(model, None, None, 0.0))
        names = set(rel.guard.frozen)
        assert names == set(component_names(model.unet, kind)) and all(must in n for n in names), kind
        others = [n for n in rel.guard.names if must in n and n not in names]
        assert not others, kind


# ---------------------------------------------------------------------------- profiles as data, reuse, reports
def test_a_profile_file_is_checked_in_full_before_any_work(tmp_path):
    good = json.loads(json.dumps(_profile().to_dict()))
    path = tmp_path / "p.json"
    path.write_text(json.dumps(good))
    loaded = BenchProfile.load(path)
    assert loaded.to_dict() == _profile().to_dict()  # round-trips, the protections' configs typed
    bad_cases = {
        "unknown field": ({**good, "stepz": 3}, "stepz"),
        "nan rate": ({**good, "lr": float("nan")}, "lr"),
        "negative rate": ({**good, "lr": -1e-4}, "lr"),
        "unknown protection": ({**good, "methods": ["none", "gaurd"]}, "gaurd"),
        "unknown option stage": ({**good, "options": {"gaurd": {}}}, "gaurd"),
        "bad option field": ({**good, "options": {"guard": {"mask_lrr": 1}}}, "mask_lrr"),
        "bad ratio unit": ({**good, "ratio_by": "tensors"}, "ratio_by"),
        "ratio out of range": ({**good, "ratios": [1.5]}, "ratios"),
    }
    for name, (data, word) in bad_cases.items():
        path.write_text(json.dumps(data).replace("NaN", "NaN"))
        with pytest.raises(ValueError, match=word) as err:
            BenchProfile.load(path)
        assert str(path) in str(err.value), name


def test_cells_of_another_run_are_reused_only_under_the_same_settings(tmp_path):
    from freezeasguard.bench.runner import reuse_cells

    profile = _profile(methods=["none", "freeze-time-embedding"], curve_cells=["none"])
    run_bench(tmp_path / "a", profile, model_loader=_loader(), recogniser=_recogniser())
    copied = reuse_cells(tmp_path / "b", profile, [tmp_path / "a"])
    assert sorted(copied) == ["figures-seed0-base", "figures-seed0-freeze-time-embedding", "figures-seed0-none"]
    assert (tmp_path / "b" / "relearn" / "figures-seed0" / "release" / "model_index.json").is_file()
    for key in copied:
        assert (json.loads((tmp_path / "a" / "cells" / f"{key}.json").read_text())
                == json.loads((tmp_path / "b" / "cells" / f"{key}.json").read_text()))
    # another attack budget: nothing of run a is valid for it
    assert reuse_cells(tmp_path / "c", _profile(methods=["none"], curve_cells=["none"], steps=3),
                       [tmp_path / "a"]) == []
    with pytest.raises(ValueError, match="not a bench output directory"):
        reuse_cells(tmp_path / "d", profile, [tmp_path])
    # a report's results.json (what docs/ keeps between sittings) gives its cells but not its models, and a
    # cell recorded with other settings stays out
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    results["cells"]["figures-seed0-none"]["settings"]["steps"] = 999
    (tmp_path / "recorded.json").write_text(json.dumps(results))
    copied = reuse_cells(tmp_path / "e", profile, [tmp_path / "recorded.json"])
    assert sorted(copied) == ["figures-seed0-base", "figures-seed0-freeze-time-embedding"]
    assert not (tmp_path / "e" / "relearn").exists()
    assert (json.loads((tmp_path / "e" / "cells" / "figures-seed0-base.json").read_text())
            == results["cells"]["figures-seed0-base"])
    # a plan that wants a learning curve a cell was run without: the cell is not reused from anywhere, and
    # the run that made it recomputes exactly that cell, now with its curve
    curved = _profile(methods=["none", "freeze-time-embedding"], curve_cells=["none", "freeze-time-embedding"])
    assert sorted(reuse_cells(tmp_path / "f", curved, [tmp_path / "a"])) == ["figures-seed0-base", "figures-seed0-none"]
    assert sorted(reuse_cells(tmp_path / "g", curved, [tmp_path / "a" / "results.json"])) == \
        ["figures-seed0-base", "figures-seed0-none"]
    # ... but its release is copied, so the recompute there starts from it
    assert (tmp_path / "f" / "work" / "figures-seed0-freeze-time-embedding" / "release").is_dir()
    cells = tmp_path / "a" / "cells"
    curveless = json.loads((cells / "figures-seed0-freeze-time-embedding.json").read_text())
    release = tmp_path / "a" / "work" / "figures-seed0-freeze-time-embedding" / "release" / "info.json"
    mtimes = {p.name: p.stat().st_mtime_ns for p in cells.iterdir()} | {"release": release.stat().st_mtime_ns}
    run_bench(tmp_path / "a", curved, model_loader=_loader(), recogniser=_recogniser())
    now = {p.name: p.stat().st_mtime_ns for p in cells.iterdir()} | {"release": release.stat().st_mtime_ns}
    assert {k for k in now if now[k] != mtimes[k]} == {"figures-seed0-freeze-time-embedding.json"}
    cell = json.loads((cells / "figures-seed0-freeze-time-embedding.json").read_text())
    assert cell["curve"] and [p["step"] for p in cell["curves"]["illegal"]] == curved.curve_steps
    # a run holding the curveless cell takes the curved one from a run that has it
    (tmp_path / "h" / "cells").mkdir(parents=True)
    (tmp_path / "h" / "cells" / "figures-seed0-freeze-time-embedding.json").write_text(json.dumps(curveless))
    assert "figures-seed0-freeze-time-embedding" in reuse_cells(tmp_path / "h", curved, [tmp_path / "a"])
    assert json.loads((tmp_path / "h" / "cells" / "figures-seed0-freeze-time-embedding.json").read_text()) == cell


def test_a_report_over_several_runs_reads_former_names_and_computes_nothing(tmp_path):
    from freezeasguard.bench.runner import report_runs

    profile = _profile(methods=["none", "freeze-time-embedding"], curve_cells=["none"])
    run_bench(tmp_path / "a", profile, model_loader=_loader(), recogniser=_recogniser())
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    # a results file written before the composite grammar, holding one cell under a former name
    old = dict(results["cells"]["figures-seed0-freeze-time-embedding"], method="guard+xattn+immunise", ratio=0.3)
    legacy = {"profile": results["profile"], "cells": {"figures-seed0-guard+xattn+immunise-r0.3": old}}
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    summary = report_runs([tmp_path / "a", tmp_path / "old.json"], tmp_path / "report")
    text = (tmp_path / "report" / "results.md").read_text()
    assert "figures-seed0-guard+freeze-cross-attention+immunise-r0.3" in text and "guard+xattn" not in text
    assert not (tmp_path / "report" / "cells").exists()  # nothing computed
    assert summary["void"] == ["figures seed 0"]
    # the same cell with other settings in two sources is refused
    clash = dict(results["cells"]["figures-seed0-none"], settings={"steps": 999})
    (tmp_path / "clash.json").write_text(json.dumps({"profile": results["profile"],
                                                     "cells": {"figures-seed0-none": clash}}))
    with pytest.raises(ValueError, match="other settings"):
        report_runs([tmp_path / "a", tmp_path / "clash.json"], tmp_path / "r2")
    # a labelled source puts a run's protections beside another's under its label, battery cells included
    attack_cell = dict(results["cells"]["figures-seed0-freeze-time-embedding"], attack="lr-x5",
                       settings={**results["cells"]["figures-seed0-freeze-time-embedding"]["settings"], "attack": {}})
    (tmp_path / "a" / "cells" / "figures-seed0-freeze-time-embedding--lr-x5.json").write_text(json.dumps(attack_cell))
    report_runs([tmp_path / "a", f"{tmp_path / 'a'}=variant"], tmp_path / "r3")
    cells = json.loads((tmp_path / "r3" / "results.json").read_text())["cells"]
    assert {"figures-seed0-variant", "figures-seed0-variant--lr-x5", "figures-seed0-freeze-time-embedding",
            "figures-seed0-none"} <= set(cells)
    # the sample grids take each cell's images from its own run, under its label or its former name: a row each
    from PIL import Image

    with Image.open(tmp_path / "a" / "samples" / "samples-figures-seed0-illegal.png") as two:
        row = (two.height - 3) // 2  # run a's grid: full fine-tuning and freeze-time-embedding
    with Image.open(tmp_path / "r3" / "samples" / "samples-figures-seed0-illegal.png") as three:
        assert three.height == 3 * row + 3
    legacy = tmp_path / "legacy"
    (legacy / "cells").mkdir(parents=True)
    (legacy / "cells" / "figures-seed0-guard+xattn+immunise-r0.3.json").write_text(json.dumps(old))
    shutil.copytree(tmp_path / "a" / "work" / "figures-seed0-freeze-time-embedding",
                    legacy / "work" / "figures-seed0-guard+xattn+immunise-r0.3")
    report_runs([tmp_path / "a", legacy], tmp_path / "r4")
    with Image.open(tmp_path / "r4" / "samples" / "samples-figures-seed0-illegal.png") as img:
        assert img.height == 3 * row + 3


def test_the_battery_runs_every_attack_on_one_release_per_protection(tmp_path):
    from freezeasguard.attacks.captions import leaks

    profile = _profile(methods=["none", "freeze-time-embedding"], curve_cells=["none"],
                       attacks=["default", "lr-x5", "renamed", "textual-inversion"])
    summary = run_bench(tmp_path, profile, model_loader=_loader(), recogniser=_recogniser())
    cells = {p.stem for p in (tmp_path / "cells").iterdir()}
    assert {"figures-seed0-none--lr-x5", "figures-seed0-freeze-time-embedding--lr-x5",
            "figures-seed0-none--renamed", "figures-seed0-freeze-time-embedding--renamed"} <= cells
    renamed = json.loads((tmp_path / "cells" / "figures-seed0-freeze-time-embedding--renamed.json").read_text())
    words = list(emoji.scenario("figures", 0).illegal)
    assert renamed["names"] and set(renamed["names"]) <= set(words)
    assert not leaks(renamed["prompts_sample"], words)  # judged on the attacker's own words
    assert "legal_near" not in renamed["domains"]  # renamed captions do not change what a legal user does
    faster = json.loads((tmp_path / "cells" / "figures-seed0-freeze-time-embedding--lr-x5.json").read_text())
    assert "legal_near" in faster["domains"]  # another rate does: the legal user is measured under it
    # one release per protection, kept, for the default cell and every attack
    assert (tmp_path / "work" / "figures-seed0-freeze-time-embedding" / "release" / "info.json").is_file()
    assert (tmp_path / "attacks.png").is_file() and "## The attack battery" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "worst-case.png").is_file()
    assert summary["battery"]["rows"] == [] or all(r["attack"] in profile.attacks for r in summary["battery"]["rows"])
    inversion = json.loads((tmp_path / "cells" / "figures-seed0-freeze-time-embedding--textual-inversion.json").read_text())
    assert all("<concept-" in p for p in inversion["prompts_sample"]) and "legal_near" not in inversion["domains"]


def test_a_config_field_added_since_a_cell_was_recorded_keeps_the_cell_only_at_its_default():
    import copy

    from freezeasguard.bench.cells import cell_settings, settings_differ

    profile = _profile(methods=["none", "freeze-cross-attention+immunise"], curve_cells=["none"])
    wanted = cell_settings(profile, "freeze-cross-attention+immunise")
    older = copy.deepcopy(wanted)
    del older["protection"]["immunise"]["reset_every_max"]  # recorded before the field existed
    assert settings_differ(older, wanted) == []
    changed = copy.deepcopy(wanted)
    changed["protection"]["immunise"]["reset_every_max"] = 400
    assert settings_differ(older, changed) == ["protection.immunise"]
    unknown = copy.deepcopy(wanted)
    unknown["protection"]["immunise"]["retired_field"] = 1
    assert settings_differ(unknown, wanted) == ["protection.immunise"]
    assert settings_differ({**wanted, "steps": 9}, wanted) == ["steps"]
