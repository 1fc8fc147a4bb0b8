"""The demo and the bench run end to end on a tiny random model (the real ones run on the embedded default)."""

from __future__ import annotations

import json

import pytest

from freezeasguard import emoji
from freezeasguard.bench import BenchProfile, markdown, run_bench, summarise
from freezeasguard.demo import DemoConfig, run_demo
from freezeasguard.evaluate import SamplingConfig
from freezeasguard.learn import LearnConfig
from freezeasguard.recogniser import Recogniser, RecogniserConfig
from freezeasguard.tiny import TinySpec, build_tiny_model
from freezeasguard.training import TrainConfig


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FREEZEASGUARD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _loader():
    spec = TinySpec(resolution=32, latent=True, vae_channels=(8, 16, 16), block_out_channels=(16, 32),
                    cross_attention=(False, True), norm_num_groups=8, max_length=32)
    return lambda: build_tiny_model(spec, seed=0)


def _recogniser():
    ids = sorted(set(emoji.families()) | set(emoji.LEGAL_FAR_CONCEPTS))
    return Recogniser(RecogniserConfig(identities=ids, resolution=32, channels=(8, 8, 8), feature_dim=8))


def _learn():
    return LearnConfig(mask_every=1, mask_steps=1, mask_batch=2, user=TrainConfig(batch_size=2, progress=False),
                       warm_start=TrainConfig(max_steps=1, batch_size=2, progress=False))


def test_demo_writes_a_report_and_resumes(tmp_path):
    cfg = DemoConfig(learn=_learn(), finetune_steps=1, finetune_batch=2, n_samples=2,
                     sampling=SamplingConfig(num_inference_steps=1, guidance_scale=1.0), grid_columns=2)
    result = run_demo(tmp_path, cfg, model_loader=_loader(), recogniser=_recogniser())
    report = tmp_path / "report"
    for name in ("report.md", "metrics.json", "mask.png", "guard.json", "grid-illegal.png", "grid-legal_near.png"):
        assert (report / name).is_file(), name
    assert {"mitigation", "legal_impact_near", "legal_impact_far"} <= set(result["derived"])
    assert len(result["validity"]) == 5
    text = (report / "report.md").read_text()
    assert "Validity checks" in text and "mitigation" in text
    # a second run reuses every stage
    before = json.loads((tmp_path / "state.json").read_text())["metrics"]
    run_demo(tmp_path, cfg, model_loader=_loader(), recogniser=_recogniser())
    assert json.loads((tmp_path / "state.json").read_text())["metrics"] == before


def test_bench_grid_runs_caches_and_reports(tmp_path):
    profile = BenchProfile("test", ["figures"], ["none", "random", "uce", "guard"], [0.3], [0], finetune_steps=1,
                           finetune_batch=2, n_samples=2, sampling=SamplingConfig(num_inference_steps=1, guidance_scale=1.0),
                           learn=_learn(), imma_steps=1)
    summary = run_bench(tmp_path, profile, model_loader=_loader(), recogniser=_recogniser())
    # a random tiny model fails the validity checks: the run is void and kept out of the derived figures
    assert summary["void"] == ["figures seed 0"] and summary["table"] == []
    assert (tmp_path / "results.md").is_file() and (tmp_path / "tradeoff.png").is_file()
    cells = sorted(p.name for p in (tmp_path / "cells").iterdir())
    assert cells == ["figures-seed0-base.json", "figures-seed0-guard-r0.3.json", "figures-seed0-none.json",
                     "figures-seed0-random-r0.3.json", "figures-seed0-uce.json"]
    text = (tmp_path / "results.md").read_text()
    assert "Void (validity checks failed" in text and "figures-seed0-guard-r0.3" in text
    # with rates that pass the checks, the derived figures follow BENCHMARK.md's formulas
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    base = cells["figures-seed0-base"]["domains"]
    for d, r in (("base_families", 0.9), ("illegal", 0.0), ("legal_near", 0.0), ("legal_far", 0.1)):
        base[d]["rate"] = r
    for key, (ill, near, far) in {"none": (0.8, 0.6, 0.5), "guard-r0.3": (0.4, 0.6, 0.45),
                                  "random-r0.3": (0.6, 0.3, 0.5), "uce": (0.8, 0.6, 0.5)}.items():
        dom = cells[f"figures-seed0-{key}"]["domains"]
        dom["illegal"]["rate"], dom["legal_near"]["rate"], dom["legal_far"]["rate"] = ill, near, far
    derived = summarise(cells, profile)
    guard_row = next(r for r in derived["table"] if r["method"] == "guard")
    assert derived["void"] == [] and guard_row["mitigation"] == pytest.approx(0.5)
    assert guard_row["legal_impact_near"] == pytest.approx(0.0) and guard_row["legal_impact_far"] == pytest.approx(0.1)
    assert guard_row["advantage_vs_random"] == pytest.approx(0.5 / 0.25) and "advantage_vs_uce" not in guard_row
    text = markdown(derived, cells, profile)
    assert "| figures | 0.3 | 50.0% |" in text.split("## The guard against")[1].split("## Validity")[0]
    base = json.loads((tmp_path / "cells" / "figures-seed0-base.json").read_text())
    assert set(base["domains"]) == {"base_families", "illegal", "legal_near", "legal_far"}
    (check_set,) = summary["validity"]
    assert len(check_set["checks"]) == 5 and check_set["valid"] is all(c["ok"] for c in check_set["checks"])
    # the bench freezes by parameter budget by default: random freezing spends at most 30% of the parameters
    random_cell = json.loads((tmp_path / "cells" / "figures-seed0-random-r0.3.json").read_text())
    assert 0.2 < random_cell["guard"]["ratio_by_params"] <= 0.3
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()}
    run_bench(tmp_path, profile, model_loader=_loader(), recogniser=_recogniser())
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()} == mtimes
    # report-only computes nothing: complete here, and an empty directory lists every cell as missing
    assert run_bench(tmp_path, profile, model_loader=_loader(), recogniser=_recogniser(),
                     report_only=True)["missing_cells"] == []
    empty = run_bench(tmp_path / "empty", profile, model_loader=_loader(), recogniser=_recogniser(), report_only=True)
    assert len(empty["missing_cells"]) == 4 + 4 and not list((tmp_path / "empty" / "cells").iterdir())
    assert "Incomplete: 8 cell(s)" in (tmp_path / "empty" / "results.md").read_text()
    # a cached cell is never reused under other settings
    other = BenchProfile(**{**profile.__dict__, "finetune_steps": 2})
    with pytest.raises(ValueError, match="finetune_steps"):
        run_bench(tmp_path, other, model_loader=_loader(), recogniser=_recogniser())


def test_bench_rejects_unknown_methods(tmp_path):
    profile = BenchProfile("test", ["figures"], ["none", "no-such-method"], [0.3], [0])
    with pytest.raises(ValueError, match="no-such-method"):
        run_bench(tmp_path, profile, model_loader=_loader(), recogniser=_recogniser())
