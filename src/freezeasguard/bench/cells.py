"""Bench cells: a setting (one scenario, form and seed: the release and every dataset its cells share) and
the cells computed on it. A cell releases the setting's model with one protection at one ratio, lets an illegal
and a legal user fine-tune the release through the guarded path, and scores the results. The illegal user has
the profile's attack budget; the legal user fine-tunes until full fine-tuning has plateaued on the legal
domains (`legal_steps`), so legal impact measures lost ability, not slower learning. Curve cells evaluate their
users at several step budgets of one run. A finished cell is cached as JSON with the settings it depends on."""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..training import TrainCallback, TrainConfig
from .evaluate import base_families_domain, evaluate, scenario_domains
from .profiles import BenchProfile, scenario_form

log = logging.getLogger(__name__)


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
    from ..model import DiffusionModel
    from . import emoji, relearn

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
    cell depends on the users, the evaluation and the release recipe; a protection's cell also on the config
    of each of its stages (`protection`), so a new learner config reruns the guard's cells and reuses the
    baselines'. Without `method`: the settings every cell shares."""
    from ..protections import config_dict, configs_for

    d = json.loads(json.dumps(profile.to_dict()))  # as it will read back from a cell
    out = {k: d[k] for k in COMMON_SETTINGS}
    if method is not None and method != "base":
        out["protection"] = json.loads(json.dumps(
            {stage: config_dict(cfg) for stage, cfg in configs_for(method, profile.typed_options()).items()}))
    return out


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
                log.info("  evaluating the %s model on %s (%d samples)", which, d, profile.n_samples)
                done[d] = evaluate(model, setting.domains[d], recogniser, n_samples=profile.n_samples,
                                   seed=setting.seed, sampling=profile.sampling)[0]
    return cell


def run_cell(setting: Setting, profile: BenchProfile, method: str, ratio: float | None, recogniser: Any, work: Path,
             *, curve: bool = False, keep_images: int = 0) -> dict[str, Any]:
    """Release with `method` at `ratio`, let both users fine-tune it, evaluate. With `keep_images`, the first
    images of each domain at the user's budget are written to work/samples-<domain>.safetensors."""
    from ..finetuning import FinetuneConfig, finetune
    from ..protections import ReleaseContext, protect

    t0 = time.perf_counter()
    log.info("  releasing with %s%s", method, "" if ratio is None else f" at ratio {ratio:g}")
    ctx = ReleaseContext(setting.load_release(), setting.publisher_illegal, setting.publisher_legal, ratio or 0.0,
                         setting.seed, work, profile.ratio_by, prompts=setting.uce)
    rel = protect(method, ctx, profile.typed_options())
    t_release = time.perf_counter() - t0
    result: dict[str, Any] = {"scenario": setting.name, "form": setting.form, "seed": setting.seed, "method": method,
                              "ratio": ratio, "curve": curve, "guard": rel.guard.summary() if rel.guard else None,
                              "release_info": rel.info,
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
                  points: list[dict[str, Any]] = points, last: int = max(budgets)) -> None:
            for d in USER_DOMAINS[user]:
                if d not in setting.domains:
                    continue
                metrics, images = evaluate(tuned, setting.domains[d], recogniser, n_samples=n, seed=setting.seed,
                                           sampling=profile.sampling)
                log.info("  %s user, step %d/%d: %s %.1f%% (%d samples)", user, step, last, d,
                         100 * metrics["rate"], n)
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
                                                              progress=True))
        t1 = time.perf_counter()
        log.info("  %s user: %d fine-tuning steps, evaluated at %s", user, max(budgets), sorted(budgets))
        finetune(tuned, data, guard=rel.guard, config=cfg, callbacks=[_Checkpoints(budgets, score)])
        result["finetune_seconds"][user] = time.perf_counter() - t1
        result["curves"][user] = points
    result["seconds"] = time.perf_counter() - t0
    return result



def describe_cell(cell: dict[str, Any]) -> str:
    if cell["method"] == "base":
        return "; ".join(f"{which}: " + ", ".join(f"{d} {100 * m['rate']:.1f}%" for d, m in doms.items())
                         for which, doms in cell["models"].items())
    return ", ".join(f"{d} {100 * m['rate']:.1f}%" for d, m in cell["domains"].items())
