"""`freezeasguard bench`: scenarios x methods x ratios x seeds, resumable, with the derived figures.

A *setting* is a scenario in one form and one seed: the model the publisher releases (the shipped base, or in
the relearn form the base taught the protected concepts and then unlearned, see `relearn`), the publisher's
and the users' data, and the evaluation domains. A *cell* releases that model (and a guard) with one method
from the registry at one ratio, lets an illegal user and a legal user fine-tune the release through the
guarded path, and scores the results. The illegal user has the profile's attack budget; the legal user
fine-tunes until full fine-tuning has plateaued on the legal domains (`legal_steps`), so legal impact measures
lost ability, not slower learning. Curve cells evaluate their users at several step budgets of one run.

A finished cell is cached as JSON (with the settings it depends on), so an interrupted bench continues where it
stopped, and the demo is one run of this same code. The report (results.md, results.json, frontier.png,
curves.png) carries the derived figures of docs/benchmark.md, the validity checks and every cell.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .evaluate import (GOAL_LEGAL_FAR, GOAL_LEGAL_NEAR, GOAL_MITIGATION, SamplingConfig, base_families_domain, evaluate,
                       scenario_domains, validity_checks)
from .io import atomic_write_json, atomic_write_text
from .immunise import ImmuniseConfig
from .learn import LearnConfig
from .relearn import RelearnConfig
from .training import TrainCallback, TrainConfig

FORMS = ("relearn", "scratch")


@dataclass
class BenchProfile:
    name: str
    scenarios: list[str]  # "figures", "artstyle" (relearn form); "figures-scratch", "artstyle-scratch"
    methods: list[str]  # a name, or "METHOD@RATIO" for that method at that ratio only
    ratios: list[float]  # the frontier: every ratio method runs at each
    seeds: list[int]
    steps: int = 400  # the illegal user's attack budget
    legal_steps: int = 800  # the legal user's budget: where full fine-tuning has plateaued on the legal domains
    batch_size: int = 32
    lr: float = 1e-4
    n_samples: int = 200
    curve_cells: list[str] = field(default_factory=lambda: ["none", "random@0.3", "guard@0.3"])
    curve_steps: list[int] = field(default_factory=lambda: [25, 50, 100, 200, 400])  # illegal user
    legal_curve_steps: list[int] = field(default_factory=lambda: [200, 400])  # legal user, below legal_steps
    curve_samples: int = 100  # samples per domain at a curve point other than the budgets
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)
    relearn: RelearnConfig = field(default_factory=RelearnConfig)
    imma_steps: int = 100
    immunise: ImmuniseConfig = field(default_factory=ImmuniseConfig)  # the "+immunise" methods (lever 5)
    keep_images: int = 8  # first samples per domain kept beside each cell (sample grids)
    ratio_by: str = "params"  # every method freezes the same share of parameters, so the comparison is fair
    # A setting whose validity checks fail (known after its base cell and full fine-tuning) is void: its other
    # cells would be left out of every figure, so they are not computed; the report lists them as skipped.
    skip_void: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, methods: dict[str, Any]) -> None:
        unknown = [m for m in self.methods if parse_cell(m)[0] not in methods]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(sorted(methods))}")
        planned_cells(self)  # refuses "METHOD@RATIO" for a method that takes no ratio
        for sc in self.scenarios:
            scenario_form(sc)
        if self.ratio_by not in ("count", "params"):
            raise ValueError(f"ratio_by must be 'count' or 'params', got {self.ratio_by!r}")
        for name in ("steps", "legal_steps", "batch_size", "n_samples", "curve_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for cell in self.curve_cells:
            method, ratio = parse_cell(cell)
            if method not in methods:
                raise ValueError(f"curve cell {cell!r}: unknown method {method!r}")


ALL_METHODS = ["none", "random", "importance-change", "importance-grad", "importance-ratio", "uce", "imma",
               "freeze-cross-attention", "freeze-resnets", "freeze-time-embedding", "guard", "guard+uce"]
FRONTIER_METHODS = ["none", "random", "importance-ratio", "freeze-cross-attention", "freeze-resnets",
                    "freeze-time-embedding", "guard"]
PROFILES = {
    # quick: the relearn scenarios sized for a 2-core CPU (each setting: the taught base and its release, then up
    # to 12 cells of 400 illegal + 800 legal user steps): the frontier at 0.3 and 0.5 for the guard, random and
    # importance freezing, two component baselines, all cross-attention released with immunised values
    # (token-selective by default, ImmuniseConfig), and the learned set at 0.3 plus every cross-attention
    # projection released that way (guard+kv+immunise, measured in docs/results.md's levers, is in the full
    # profile only: the quick one must fit 3 h); curves for full fine-tuning, random freezing, the guard at 0.3
    # and the immunised releases. A void setting stops after its validity cells (skip_void): artstyle is void on
    # this model (docs/results.md), so it costs its relearn models and two cells. Time, measured: docs/results.md.
    # Legal users run 800 steps: on figures seed 0, full fine-tuning's legal-near rate was 79 / 90 / 94% at
    # 400 / 800 / 1600 steps and legal-far 96 / 92 / 97% (its plateau from 400 on).
    "quick": BenchProfile("quick", ["figures", "artstyle"],
                          ["none", "random", "importance-ratio", "freeze-cross-attention", "freeze-resnets", "guard",
                           "freeze-cross-attention+immunise", "guard+xattn+immunise@0.3"],
                          [0.3, 0.5], [0, 1], legal_steps=800, n_samples=100,
                          curve_cells=["none", "random@0.3", "guard@0.3", "freeze-cross-attention+immunise",
                                       "guard+xattn+immunise@0.3"],
                          curve_steps=[25, 50, 100, 200, 400], legal_curve_steps=[200, 400]),
    # full: every method, the whole frontier, three seeds, longer curves: for a GPU.
    "full": BenchProfile("full", ["figures", "artstyle", "figures-scratch", "artstyle-scratch"],
                         FRONTIER_METHODS + ["importance-change", "importance-grad", "imma", "guard+uce",
                                             "freeze-cross-attention+immunise", "guard+immunise", "random+immunise",
                                             "guard+kv+immunise", "guard+xattn+immunise"],
                         [0.1, 0.2, 0.3, 0.5, 0.7], [0, 1, 2], legal_steps=1600, n_samples=400,
                         curve_cells=["none", "random@0.3", "importance-ratio@0.3", "guard@0.3", "guard@0.5"],
                         curve_steps=[25, 50, 100, 200, 400, 800, 1600], legal_curve_steps=[200, 400, 800]),
}


def scenario_form(name: str) -> tuple[str, str]:
    """'figures' -> ('figures', 'relearn'); 'figures-scratch' -> ('figures', 'scratch')."""
    base, _, form = name.partition("-")
    form = form or "relearn"
    if base not in ("figures", "artstyle") or form not in FORMS:
        raise ValueError(f"unknown scenario {name!r}: use figures or artstyle, optionally with -scratch")
    return base, form


def parse_cell(spec: str) -> tuple[str, float | None]:
    """'guard@0.3' -> ('guard', 0.3); 'none' -> ('none', None)."""
    method, _, ratio = spec.partition("@")
    return method, (float(ratio) if ratio else None)


def cell_key(scenario: str, seed: int, method: str, ratio: float | None) -> str:
    return f"{scenario}-seed{seed}-{method}" + ("" if ratio is None else f"-r{ratio:g}")


# ---------------------------------------------------------------------------- settings
@dataclass
class Setting:
    """One scenario in one form and one seed: what every cell of it shares."""

    name: str
    form: str
    seed: int
    scenario: Any
    load_release: Any  # () -> a fresh DiffusionModel of the released (pre-method) model
    load_taught: Any  # relearn form: () -> the base that knows the concepts; scratch: None
    domains: dict[str, Any]
    publisher_illegal: Any
    publisher_legal: Any
    users: dict[str, Any]
    uce: dict[str, list[str]]


def prepare_setting(name: str, seed: int, profile: BenchProfile, out: Path, base_loader: Any) -> Setting:
    from . import emoji, relearn
    from .model import DiffusionModel

    base_name, form = scenario_form(name)
    sc = emoji.scenario(base_name, seed)
    if form == "relearn":
        dirs = relearn.prepare(sc, base_loader, out / "relearn" / f"{base_name}-seed{seed}", profile.relearn)

        def loader(which: str) -> Any:
            return lambda: DiffusionModel.from_pretrained(dirs[which], torch_dtype=torch.float32)
        load_release, load_taught = loader("release"), loader("taught")
    else:
        load_release, load_taught = base_loader, None
    res = load_release().resolution
    domains = scenario_domains(sc, res)
    domains["base_families"] = base_families_domain(res)

    def data(*parts: tuple[str, str]) -> Any:
        return emoji.dataset([it for d, side in parts for it in sc.items(d, side)], res, preload=True)

    return Setting(
        name=name, form=form, seed=seed, scenario=sc, load_release=load_release, load_taught=load_taught,
        domains=domains, publisher_illegal=data(("illegal", "publisher")),
        publisher_legal=data(("legal_near", "publisher"), ("legal_far", "publisher")),
        users={"illegal": data(("illegal", "user")), "legal": data(("legal_near", "user"), ("legal_far", "user"))},
        uce=relearn.uce_prompts(sc, preserve_base_people=profile.relearn.uce_preserve_base_people))


# ---------------------------------------------------------------------------- cells
USER_DOMAINS = {"illegal": ("illegal",), "legal": ("legal_near", "legal_far")}


class _Checkpoints(TrainCallback):
    """Evaluates the model being fine-tuned at chosen step budgets (one run serves a whole learning curve;
    with a constant learning rate and the core's (seed, k) sampling, step s of a longer run is the s-step run)."""

    name = "checkpoints"

    def __init__(self, evaluate_at: dict[int, int], fn: Any) -> None:
        self.evaluate_at, self.fn = evaluate_at, fn  # step -> samples

    def on_step_end(self, ctx: Any) -> None:
        n = self.evaluate_at.get(ctx.step)
        if n is not None:
            with torch.no_grad():
                self.fn(ctx.step, n)


def user_budgets(profile: BenchProfile, user: str, curve: bool) -> dict[int, int]:
    """Step -> evaluation samples for one user's run: the budget at full samples, curve points (if a curve
    cell) at curve_samples. The run lasts until the largest step."""
    budget = profile.steps if user == "illegal" else profile.legal_steps
    points = {budget: profile.n_samples}
    if curve:
        extra = profile.curve_steps if user == "illegal" else [s for s in profile.legal_curve_steps if s < budget]
        for s in extra:
            points.setdefault(s, profile.curve_samples)
    return dict(sorted(points.items()))


COMMON_SETTINGS = ("steps", "legal_steps", "batch_size", "lr", "n_samples", "curve_steps", "legal_curve_steps",
                   "curve_samples", "sampling", "relearn", "ratio_by")


def cell_settings(profile: BenchProfile, method: str | None = None) -> dict[str, Any]:
    """What a cached cell depends on besides its key: a rerun with other settings must not reuse it. Every
    cell depends on the users, the evaluation and the release recipe; a method's cell also on the profile
    sections the method reads (`MethodSpec.uses`: the learner's config for the guard, ...), so a new learner
    reruns the guard's cells and reuses the baselines'. Without `method`: the settings every cell shares."""
    from .baselines import METHODS

    d = json.loads(json.dumps(profile.to_dict()))  # as it will read back from a cell
    keys = COMMON_SETTINGS + (METHODS[method].uses if method in METHODS else ())
    return {k: d[k] for k in keys}


def load_cell(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """A cached cell, if it was made with `settings` (a cell may record more settings than its method reads:
    cells written before settings were per method recorded every section)."""
    cell = json.loads(path.read_text())
    theirs = cell.get("settings") or {}
    if any(theirs.get(k) != v for k, v in settings.items()) or not theirs:
        diff = sorted(k for k in settings if settings.get(k) != theirs.get(k))
        raise ValueError(f"{path}: cached with other settings ({', '.join(diff) or 'none recorded'}); "
                         f"use another --out directory, or delete {path.name} and the folder work/{path.stem} to recompute it")
    return cell


def run_base_cell(setting: Setting, profile: BenchProfile, recogniser: Any, cached: dict[str, Any] | None) -> dict[str, Any]:
    """What the models before any user know: the release on every domain; in the relearn form also the taught
    base on the base families and the illegal domain. Completes a cached cell that lacks a domain."""
    cell = cached or {"scenario": setting.name, "seed": setting.seed, "method": "base", "ratio": None,
                      "form": setting.form, "models": {}}
    plan = {"release": (setting.load_release, ["base_families", "illegal", "legal_near", "legal_far"])}
    if setting.load_taught is not None:
        plan["taught"] = (setting.load_taught, ["base_families", "illegal"])
    for which, (load, wanted) in plan.items():
        done = cell["models"].setdefault(which, {})
        missing = [d for d in wanted if d in setting.domains and d not in done]
        if missing:
            model = load()
            for d in missing:
                done[d] = evaluate(model, setting.domains[d], recogniser, n_samples=profile.n_samples,
                                   seed=setting.seed, sampling=profile.sampling)[0]
    return cell


def run_cell(setting: Setting, profile: BenchProfile, method: str, ratio: float | None, recogniser: Any, work: Path,
             *, curve: bool = False, keep_images: int = 0) -> dict[str, Any]:
    """Release with `method` at `ratio`, let both users fine-tune it, evaluate. With `keep_images`, the first
    images of each domain at the user's budget are written to work/samples-<domain>.safetensors."""
    from .baselines import MethodContext, MethodOptions, release
    from .finetuning import FinetuneConfig, finetune

    t0 = time.perf_counter()
    options = MethodOptions(learn=profile.learn, imma_steps=profile.imma_steps, immunise=profile.immunise,
                            uce_edit=setting.uce["uce_edit"],
                            uce_guide=setting.uce["uce_guide"], uce_preserve=setting.uce["uce_preserve"],
                            uce_lambda=profile.relearn.uce_lambda)
    rel = release(method, MethodContext(setting.load_release(), setting.publisher_illegal, setting.publisher_legal,
                                        ratio or 0.0, setting.seed, options, work, profile.ratio_by))
    t_release = time.perf_counter() - t0
    result: dict[str, Any] = {"scenario": setting.name, "form": setting.form, "seed": setting.seed, "method": method,
                              "ratio": ratio, "curve": curve, "guard": rel.guard.summary() if rel.guard else None,
                              "release_info": {k: v for k, v in rel.info.items() if k != "uce_edited_tensors"},
                              "release_seconds": t_release, "domains": {}, "curves": {}, "finetune_seconds": {}}
    if rel.guard is not None and work is not None:
        work.mkdir(parents=True, exist_ok=True)
        rel.guard.save(work / "guard.json")
    for user, data in setting.users.items():
        budgets = user_budgets(profile, user, curve)
        budget = profile.steps if user == "illegal" else profile.legal_steps
        tuned = copy.deepcopy(rel.model)
        points: list[dict[str, Any]] = []

        def score(step: int, n: int, tuned: Any = tuned, user: str = user, budget: int = budget,
                  points: list[dict[str, Any]] = points) -> None:
            for d in USER_DOMAINS[user]:
                if d not in setting.domains:
                    continue
                metrics, images = evaluate(tuned, setting.domains[d], recogniser, n_samples=n, seed=setting.seed,
                                           sampling=profile.sampling)
                points.append({"step": step, "domain": d, "rate": metrics["rate"], "mean_prob": metrics["mean_prob"],
                               "n": metrics["n"]})
                if step == budget:
                    result["domains"][d] = metrics
                    if keep_images:
                        from safetensors.torch import save_file

                        work.mkdir(parents=True, exist_ok=True)
                        save_file({"images": images[:keep_images].contiguous()}, str(work / f"samples-{d}.safetensors"))

        cfg = FinetuneConfig(method="full", train=TrainConfig(max_steps=max(budgets), batch_size=profile.batch_size,
                                                              learning_rate=profile.lr, seed=setting.seed,
                                                              progress=False))
        t1 = time.perf_counter()
        finetune(tuned, data, guard=rel.guard, config=cfg, callbacks=[_Checkpoints(budgets, score)])
        result["finetune_seconds"][user] = time.perf_counter() - t1
        result["curves"][user] = points
    result["seconds"] = time.perf_counter() - t0
    return result


def planned_cells(profile: BenchProfile) -> list[tuple[str, float | None, bool]]:
    """(method, ratio, curve) of every cell of a setting, in the profile's order."""
    from .baselines import METHODS

    curve_specs = {parse_cell(c) for c in profile.curve_cells}
    out = []
    for spec in profile.methods:
        method, only = parse_cell(spec)  # "METHOD@RATIO": that method at that ratio alone
        if only is not None and not METHODS[method].needs_ratio:
            raise ValueError(f"method {spec!r}: {method} takes no ratio")
        ratios = [only] if only is not None else (profile.ratios if METHODS[method].needs_ratio else [None])
        for ratio in ratios:
            out.append((method, ratio, (method, ratio) in curve_specs))
    return out


BENCH_PRODUCTS = ("cells", "work", "relearn", "results.json", "results.md", "frontier.png", "curves.png")


def run_bench(out: str | Path, profile: BenchProfile, *, model_loader: Any = None, recogniser: Any = None,
              command: str | None = None, report_only: bool = False, overwrite: bool = False,
              claim_as: str = "bench", extra_products: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run (or resume) the grid into `out` and write the report. With `report_only`, nothing is computed: the
    report covers the cells cached so far and lists the missing ones.

    The run owns `out` (io.claim_output_dir): another run on it at the same time fails at once, and a
    directory of a run with other cell settings is refused unless `overwrite`. A report-only run takes no
    claim: it computes nothing and rewrites only the report files."""
    from .baselines import METHODS
    from .io import claim_output_dir

    profile.validate(METHODS)
    out = Path(out)
    identity = {"cell_settings": cell_settings(profile)}
    with claim_output_dir(None if report_only else out, claim_as, identity, BENCH_PRODUCTS + extra_products,
                          overwrite=overwrite):
        return _run_bench(out, profile, model_loader=model_loader, recogniser=recogniser, command=command,
                          report_only=report_only)


def _run_bench(out: Path, profile: BenchProfile, *, model_loader: Any, recogniser: Any, command: str | None,
               report_only: bool) -> dict[str, Any]:
    from . import zoo

    cells_dir = out / "cells"
    if not report_only:
        cells_dir.mkdir(parents=True, exist_ok=True)
    load = model_loader or zoo.load_base
    rec = recogniser or zoo.load_recogniser()
    cells: dict[str, Any] = {}
    missing_cells: list[str] = []
    skipped_void: list[str] = []
    # seed-major: an interrupted bench has covered every scenario for the first seeds
    for seed in profile.seeds:
        for name in profile.scenarios:
            plan = [("base", None, False)] + planned_cells(profile)
            keys = {cell_key(name, seed, m, r): (m, r, c) for m, r, c in plan}
            cached = {k: load_cell(cells_dir / f"{k}.json", cell_settings(profile, keys[k][0]))
                      for k in keys if (cells_dir / f"{k}.json").exists()}
            cells.update(cached)
            todo = [k for k in keys if k not in cached]
            if report_only:
                void = profile.skip_void and setting_is_void(cells, name, seed)
                for k in todo:
                    (skipped_void if void and keys[k][0] not in VALIDITY_METHODS else missing_cells).append(k)
                continue
            if not todo:
                continue
            setting = prepare_setting(name, seed, profile, out, load)
            # the validity cells first (base, full fine-tuning), so a void setting is known before the rest
            todo.sort(key=lambda k: keys[k][0] not in VALIDITY_METHODS)
            for key in todo:
                method, ratio, curve = keys[key]
                if profile.skip_void and method not in VALIDITY_METHODS and setting_is_void(cells, name, seed):
                    skipped_void.append(key)
                    continue
                print(f"bench: {key} ...", flush=True)
                if method == "base":
                    cell = run_base_cell(setting, profile, rec, None)
                else:
                    cell = run_cell(setting, profile, method, ratio, rec, out / "work" / key, curve=curve,
                                    keep_images=profile.keep_images)
                cell["settings"] = cell_settings(profile, method)
                atomic_write_json(cells_dir / f"{key}.json", cell)
                cells[key] = cell
                print(f"bench: {key} done: " + describe_cell(cell), flush=True)
    summary = summarise(cells, profile)
    summary["missing_cells"] = missing_cells
    summary["skipped_void"] = skipped_void
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {"profile": profile.to_dict(), "cells": cells, "summary": summary})
    plot_frontier(summary, out / "frontier.png")
    plot_curves(summary, out / "curves.png")
    atomic_write_text(out / "results.md", markdown(summary, cells, profile, command))
    return summary


def describe_cell(cell: dict[str, Any]) -> str:
    if cell["method"] == "base":
        return "; ".join(f"{which}: " + ", ".join(f"{d} {100 * m['rate']:.1f}%" for d, m in doms.items())
                         for which, doms in cell["models"].items())
    return ", ".join(f"{d} {100 * m['rate']:.1f}%" for d, m in cell["domains"].items())


# ---------------------------------------------------------------------------- derived figures
def _metric(cell: dict[str, Any] | None, domain: str, what: str = "rate") -> float | None:
    if cell is None or domain not in cell.get("domains", {}):
        return None
    return cell["domains"][domain][what]


def _one_minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else 1 - a / b


VALIDITY_METHODS = ("base", "none")  # the cells a setting's validity checks read


def setting_is_void(cells: dict[str, Any], scenario: str, seed: int) -> bool:
    """Whether the setting's validity checks have failed, once both cells they read are there (False before)."""
    base = cells.get(cell_key(scenario, seed, "base", None))
    full = cells.get(cell_key(scenario, seed, "none", None))
    if base is None or full is None:
        return False
    return not all(c["ok"] for c in setting_validity(base, full))


def setting_validity(base_cell: dict[str, Any], full_cell: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The validity checks of one setting from its base cell and its full fine-tuning cell."""
    models = base_cell.get("models", {})
    values: dict[str, float | None] = {}
    for which, doms in models.items():
        for d, m in doms.items():
            values[f"{which}_{d}"] = m["rate"]
    for d in ("illegal", "legal_near", "legal_far"):
        values[f"full_{d}"] = _metric(full_cell, d)
    return validity_checks(base_cell.get("form", "relearn"), values)


def steps_to_reach(points: list[dict[str, Any]], domain: str, target: float) -> int | None:
    """The first evaluated step at which the rate on `domain` reaches `target`; None: not reached."""
    for p in sorted((p for p in points if p["domain"] == domain), key=lambda p: p["step"]):
        if p["rate"] >= target:
            return int(p["step"])
    return None


def curve_rows(cells: dict[str, Any], profile: BenchProfile, void: set[tuple[str, int]]) -> list[dict[str, Any]]:
    """Per curve cell: its points, and the slowdown: the steps it needs to reach 90% of what full fine-tuning
    reached at the attack budget (None: not reached within the run)."""
    rows = []
    for key, cell in sorted(cells.items()):
        if cell["method"] == "base" or not cell.get("curve"):
            continue
        full = cells.get(cell_key(cell["scenario"], cell["seed"], "none", None))
        target_rate = _metric(full, "illegal")
        row = {"key": key, "scenario": cell["scenario"], "seed": cell["seed"], "method": cell["method"],
               "ratio": cell["ratio"], "valid": (cell["scenario"], cell["seed"]) not in void,
               "points": cell.get("curves", {}), "target": None, "steps_to_target": None,
               "max_step": max((p["step"] for p in cell.get("curves", {}).get("illegal", [])), default=None)}
        if target_rate is not None:
            row["target"] = 0.9 * target_rate
            row["steps_to_target"] = steps_to_reach(cell["curves"].get("illegal", []), "illegal", row["target"])
        rows.append(row)
    return rows


def summarise(cells: dict[str, Any], profile: BenchProfile) -> dict[str, Any]:
    """Derived figures per scenario, method and ratio, averaged over valid seeds (each against full
    fine-tuning of the same scenario and seed), on the recognition rate and on the mean probability."""
    validity = []
    for cell in cells.values():
        if cell["method"] != "base":
            continue
        checks = setting_validity(cell, cells.get(cell_key(cell["scenario"], cell["seed"], "none", None)))
        validity.append({"scenario": cell["scenario"], "seed": cell["seed"], "form": cell.get("form", "relearn"),
                         "checks": checks, "valid": all(c["ok"] for c in checks)})
    # a setting whose validity checks fail is void; its cells stay in the per-cell table only
    void = {(v["scenario"], v["seed"]) for v in validity if not v["valid"]}
    rows: dict[tuple[str, str, Any], dict[str, list[float]]] = {}
    for cell in cells.values():
        if cell["method"] == "base" or (cell["scenario"], cell["seed"]) in void:
            continue
        full = cells.get(cell_key(cell["scenario"], cell["seed"], "none", None))
        acc = rows.setdefault((cell["scenario"], cell["method"], cell["ratio"]), {})
        values = {"frozen_tensors": (cell.get("guard") or {}).get("ratio_by_count", 0.0),
                  "frozen_params": (cell.get("guard") or {}).get("ratio_by_params", 0.0),
                  "release_seconds": cell.get("release_seconds")}
        for what, suffix in (("rate", ""), ("mean_prob", "_prob")):
            values[f"illegal{suffix}"] = _metric(cell, "illegal", what)
            values[f"mitigation{suffix}"] = _one_minus(_metric(cell, "illegal", what), _metric(full, "illegal", what))
            for d, short in (("legal_near", "near"), ("legal_far", "far")):
                values[f"{d}{suffix}"] = _metric(cell, d, what)
                values[f"legal_impact_{short}{suffix}"] = _one_minus(_metric(cell, d, what), _metric(full, d, what))
        for name, value in values.items():
            if value is not None:
                acc.setdefault(name, []).append(value)
    table = []
    order: dict[str, int] = {}
    for i, spec in enumerate(profile.methods):
        order.setdefault(parse_cell(spec)[0], i)  # the profile's order: baselines first, the guard last
    for (sc, method, ratio), acc in sorted(rows.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], len(order)),
                                                                         kv[0][1], kv[0][2] or 0)):
        table.append({"scenario": sc, "method": method, "ratio": ratio, "seeds": len(acc.get("illegal", [])),
                      **{k: sum(v) / len(v) for k, v in acc.items()},
                      "mitigation_per_seed": acc.get("mitigation", [])})
    for row in table:  # advantage over random freezing at the same ratio
        ref = next((r for r in table if r["scenario"] == row["scenario"] and r["method"] == "random"
                    and r["ratio"] == row["ratio"]), None)
        if ref and (ref.get("mitigation") or 0) > 0 and row.get("mitigation") is not None:
            row["advantage_vs_random"] = row["mitigation"] / ref["mitigation"]
    return {"table": table, "validity": validity, "void": sorted(f"{sc} seed {seed}" for sc, seed in void),
            "curves": curve_rows(cells, profile, void), "frontier": frontier_verdicts(table)}


def meets_goals(row: dict[str, Any]) -> bool:
    return ((row.get("mitigation") or 0) >= GOAL_MITIGATION and row.get("legal_impact_near") is not None
            and row.get("legal_impact_far") is not None and row["legal_impact_near"] <= GOAL_LEGAL_NEAR
            and row["legal_impact_far"] <= GOAL_LEGAL_FAR)


def frontier_verdicts(table: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per scenario: which method reaches the highest mitigation within the legal-impact goals, and at each
    ratio which method has the best margin (mitigation minus the worse legal impact, near or far)."""
    out: dict[str, dict[str, Any]] = {}
    for sc in sorted({r["scenario"] for r in table}):
        rows = [r for r in table if r["scenario"] == sc and r["method"] != "none" and r.get("mitigation") is not None]
        feasible = [r for r in rows if (r.get("legal_impact_near") or 0) <= GOAL_LEGAL_NEAR
                    and (r.get("legal_impact_far") or 0) <= GOAL_LEGAL_FAR]
        best = max(feasible, key=lambda r: r["mitigation"], default=None)

        def margin(r: dict[str, Any]) -> float:
            return r["mitigation"] - max(r.get("legal_impact_near") or 0, r.get("legal_impact_far") or 0)
        per_ratio = {}
        for ratio in sorted({r["ratio"] for r in rows if r["ratio"] is not None}):
            at = [r for r in rows if r["ratio"] == ratio]
            top = max(at, key=margin)
            per_ratio[f"{ratio:g}"] = {"method": top["method"], "margin": margin(top)}
        out[sc] = {"best_within_goals": None if best is None else
                   {"method": best["method"], "ratio": best["ratio"], "mitigation": best["mitigation"]},
                   "best_margin_per_ratio": per_ratio,
                   "goals_met_by": [f"{r['method']}@{r['ratio']}" for r in rows if meets_goals(r)]}
    return out


# ---------------------------------------------------------------------------- plots
def _axes_grid(n_rows: int, n_cols: int, size: tuple[float, float]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size[0] * n_cols, size[1] * n_rows), squeeze=False)
    return plt, fig, axes


def plot_frontier(summary: dict[str, Any], path: Path) -> None:
    """Mitigation vs legal impact (near and far), a line per method over the ratios, the goal box shaded."""
    scenarios = sorted({r["scenario"] for r in summary["table"]}) or ["(no valid setting)"]
    plt, fig, axes = _axes_grid(2, len(scenarios), (6.0, 4.6))
    methods = list(dict.fromkeys(r["method"] for r in summary["table"]))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for col, sc in enumerate(scenarios):
        for row, (impact, goal, label) in enumerate((("legal_impact_near", GOAL_LEGAL_NEAR, "legal-near"),
                                                     ("legal_impact_far", GOAL_LEGAL_FAR, "legal-far"))):
            ax = axes[row][col]
            for method in methods:
                pts = sorted(((r.get(impact), r["mitigation"], r["ratio"]) for r in summary["table"]
                              if r["scenario"] == sc and r["method"] == method and r.get("mitigation") is not None
                              and r.get(impact) is not None), key=lambda p: p[2] or 0)
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) > 1 else "D",
                        color=colours[method], lw=1.2, label=method)
                for x, y, q in pts:
                    if q is not None:
                        ax.annotate(f"{q:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            lo_x = min(-0.1, ax.get_xlim()[0])
            ax.fill_between([lo_x, goal], GOAL_MITIGATION, 1.0, color="green", alpha=0.12, label="goal")
            ax.axhline(0, color="grey", lw=0.5)
            ax.axvline(0, color="grey", lw=0.5)
            ax.set_xlim(lo_x, max(1.0, ax.get_xlim()[1]))
            ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.0)
            ax.set_xlabel(f"legal impact on {label} (lower is better)")
            ax.set_ylabel("mitigation (higher is better)")
            ax.set_title(f"{sc}: mitigation vs {label} impact")
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell_label(row: dict[str, Any]) -> str:
    name = "full fine-tuning" if row["method"] == "none" else row["method"]
    return name + ("" if row["ratio"] is None else f"@{row['ratio']:g}")


def plot_curves(summary: dict[str, Any], path: Path) -> None:
    """Recognition vs user steps for every curve cell (illegal user; legal users beside), one row per scenario."""
    scenarios = sorted({r["scenario"] for r in summary["curves"]}) or ["(no curve cells)"]
    plt, fig, axes = _axes_grid(len(scenarios), 3, (5.0, 3.8))
    labels = list(dict.fromkeys(_cell_label(r) for r in summary["curves"]))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(labels)}
    seeds = sorted({r["seed"] for r in summary["curves"]})
    seed_styles = ["-", "--", "-.", (0, (5, 1, 1, 1))]
    from matplotlib import ticker

    for row, sc in enumerate(scenarios):
        for col, (user, domain) in enumerate((("illegal", "illegal"), ("legal", "legal_near"), ("legal", "legal_far"))):
            ax = axes[row][col]
            steps_seen: set[int] = set()
            for r in summary["curves"]:
                if r["scenario"] != sc:
                    continue
                label = _cell_label(r)
                pts = sorted((p["step"], p["rate"]) for p in r["points"].get(user, []) if p["domain"] == domain)
                if pts:
                    steps_seen.update(p[0] for p in pts)
                    # colour: the cell; line style: the seed (solid, dashed, ...); void settings dotted
                    style = seed_styles[seeds.index(r["seed"]) % len(seed_styles)] if r["valid"] else ":"
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=colours[label],
                            ls=style, lw=1.0, label=f"{label} seed {r['seed']}" + ("" if r["valid"] else " (void)"))
            ax.set_xscale("log")
            # the evaluated steps as plain tick labels (log-scale minor labels overlap at these ranges)
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.set_xticks(sorted(steps_seen))
            ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
            ax.tick_params(axis="x", labelsize=7)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("user fine-tuning steps")
            ax.set_ylabel("recognition rate")
            ax.set_title(f"{sc}: {domain}")
            if col == 0 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- report
def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _per_seed(row: dict[str, Any]) -> str:
    values = row.get("mitigation_per_seed") or []
    return "" if len(values) < 2 else " (" + ", ".join(f"{100 * v:.0f}" for v in values) + ")"


def validity_lines(validity: list[dict[str, Any]]) -> list[str]:
    lines = []
    for form in FORMS:
        group = [v for v in validity if v["form"] == form]
        if not group:
            continue
        checks = group[0]["checks"]
        lines += [f"Form `{form}`:", "", "| scenario | seed | " + " | ".join(f"{c['check']} ({c['threshold']})"
                                                                        for c in checks) + " | valid |",
                  "|---|---|" + "---|" * len(checks) + "---|"]
        for v in group:
            vals = " | ".join(f"{_p(c['value'])}{'' if c['ok'] else ' FAIL'}" for c in v["checks"])
            lines.append(f"| {v['scenario']} | {v['seed']} | {vals} | {'yes' if v['valid'] else 'NO: void'} |")
        lines.append("")
    return lines


def curve_lines(summary: dict[str, Any], profile: BenchProfile) -> list[str]:
    if not summary["curves"]:
        return ["No curve cells in this run.", ""]
    lines = ["Slowdown: the steps the illegal user needs to reach 90% of what full fine-tuning reached at the attack "
             f"budget ({profile.steps} steps); 'not reached' means not within the run's last evaluated step.", "",
             "| scenario | seed | cell | target rate | steps to target | illegal rate at each step |", "|---|---|---|---|---|---|"]
    for r in summary["curves"]:
        pts = sorted((p["step"], p["rate"]) for p in r["points"].get("illegal", []))
        reached = "n/a" if r["target"] is None else (str(r["steps_to_target"]) if r["steps_to_target"] is not None
                                                     else f"not reached by {r['max_step']}")
        cell = _cell_label(r)
        lines.append(f"| {r['scenario']} | {r['seed']}{'' if r['valid'] else ' (void)'} | {cell} | {_p(r['target'])} | "
                     f"{reached} | " + ", ".join(f"{s}: {_p(v)}" for s, v in pts) + " |")
    lines += ["", "Legal users' curves (rate per step) are in results.json and curves.png.", ""]
    return lines


def markdown(summary: dict[str, Any], cells: dict[str, Any], profile: BenchProfile, command: str | None = None) -> str:
    by = "parameters" if profile.ratio_by == "params" else "tensor count"
    lines = [f"# freezeasguard benchmark (profile `{profile.name}`)", "",
             f"Command: `{command or 'freezeasguard bench --profile ' + profile.name}`. Every number below was "
             "measured by that command (results.json holds every cell, its settings and timings).", "",
             f"Scenarios {', '.join(profile.scenarios)} (relearn form unless named -scratch); methods "
             f"{', '.join(profile.methods)}; freeze ratios {', '.join(f'{r:g}' for r in profile.ratios)} by {by}; "
             f"seeds {profile.seeds}. The illegal user fine-tunes the release {profile.steps} AdamW steps (the attack "
             f"budget), the legal user {profile.legal_steps} (where full fine-tuning has plateaued on the legal "
             f"domains); batch {profile.batch_size}, lr {profile.lr}, through the guarded path. {profile.n_samples} "
             f"samples per domain at the budgets, {profile.curve_samples} at the other curve points. Learning "
             f"curves for {', '.join(profile.curve_cells)} at illegal steps {profile.curve_steps}.", ""]
    if summary.get("skipped_void"):
        lines += [f"**Skipped: {len(summary['skipped_void'])} cell(s) of void settings were not computed** "
                  f"(`skip_void`; their validity checks failed, so no figure would use them): "
                  f"{', '.join(summary['skipped_void'])}.", ""]
    if summary.get("missing_cells"):
        lines += [f"**Incomplete: {len(summary['missing_cells'])} cell(s) not computed yet** "
                  f"({', '.join(summary['missing_cells'])}); averages cover the seeds present.", ""]
    lines += ["## Validity checks", "", "A setting (scenario, seed) whose checks fail is void: its cells are left out "
              "of every derived figure and listed at the end.", ""]
    lines += validity_lines(summary["validity"])
    if summary.get("void"):
        lines += [f"**Void: {', '.join(summary['void'])}.**", ""]
    lines += ["## Derived figures (mean over valid seeds)", "",
              "mitigation = 1 - illegal(method) / illegal(full fine-tuning); legal impact = 1 - legal(method) / "
              "legal(full fine-tuning); per seed against full fine-tuning of the same release on the same data and "
              "steps. *rate*: top-1 recognition; *prob*: the recogniser's mean probability of the prompted "
              "identity/style (continuous). In brackets: mitigation per seed. Frozen = share of UNet tensors / "
              "parameters the guard freezes.", "",
              "| scenario | method | ratio | frozen tensors / params | illegal rate | mitigation (rate) | mitigation (prob) "
              "| legal impact near (rate / prob) | legal impact far (rate / prob) | adv. vs random | release time |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["table"]:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:g}"
        adv = "n/a" if r.get("advantage_vs_random") is None else f"{r['advantage_vs_random']:.2f}"
        secs = "n/a" if r.get("release_seconds") is None else f"{r['release_seconds']:.0f} s"
        lines.append(
            f"| {r['scenario']} | {r['method']} | {ratio} | {_p(r.get('frozen_tensors'))} / {_p(r.get('frozen_params'))} | "
            f"{_p(r.get('illegal'))} | {_p(r.get('mitigation'))}{_per_seed(r)} | {_p(r.get('mitigation_prob'))} | "
            f"{_p(r.get('legal_impact_near'))} / {_p(r.get('legal_impact_near_prob'))} | "
            f"{_p(r.get('legal_impact_far'))} / {_p(r.get('legal_impact_far_prob'))} | {adv} | {secs} |")
    lines += ["", "## The frontier", "",
              f"Goal (docs/benchmark.md): mitigation >= {GOAL_MITIGATION:.0%} with legal impact <= "
              f"{GOAL_LEGAL_NEAR:.0%} (near) and <= {GOAL_LEGAL_FAR:.0%} (far), at a ratio <= 0.5, on every seed. "
              "Margin = mitigation minus the worse legal impact.", ""]
    for sc, v in summary["frontier"].items():
        best = v["best_within_goals"]
        head = (f"**{sc}**: within the legal-impact goals the highest mitigation is {best['method']}"
                + ("" if best["ratio"] is None else f" at {best['ratio']:g}") + f" ({_p(best['mitigation'])})"
                if best else f"**{sc}**: no method stays within the legal-impact goals")
        per = "; ".join(f"{q}: {m['method']} ({_p(m['margin'])})" for q, m in v["best_margin_per_ratio"].items())
        met = ", ".join(v["goals_met_by"]) or "none"
        lines.append(f"- {head}. Best margin per ratio: {per or 'n/a'}. All goals met by: {met}.")
    lines += ["", "![frontier](frontier.png)", "", "## Learning curves", ""]
    lines += curve_lines(summary, profile)
    lines += ["![curves](curves.png)", "", "## Every cell (recognition rate with bootstrap 95% interval)", "",
              "| cell | model | domain | rate [95% CI] | mean prob | FD |", "|---|---|---|---|---|---|"]
    for key in sorted(cells):
        cell = cells[key]
        groups = cell["models"].items() if cell["method"] == "base" else [("fine-tuned", cell["domains"])]
        for which, doms in groups:
            for d, m in doms.items():
                fid = "n/a" if m.get("fid") is None else f"{m['fid']:.2f}"
                lines.append(f"| {key} | {which} | {d} | {_p(m['rate'])} [{_p(m['rate_ci95'][0])}, "
                             f"{_p(m['rate_ci95'][1])}] | {_p(m.get('mean_prob'))} | {fid} |")
    return "\n".join(lines) + "\n"


def replace_profile(profile: BenchProfile, **changes: Any) -> BenchProfile:
    """The profile with `changes` (None values ignored): how the CLI narrows a profile."""
    return replace(profile, **{k: v for k, v in changes.items() if v is not None})
