"""Bench cells: a setting (one scenario, form and seed: the release and every dataset its cells share) and
the cells computed on it. A cell releases the setting's model with one protection at one ratio, lets an illegal
and a legal user fine-tune the release through the guarded path, and scores the results. The illegal user has
the profile's attack budget; the legal user fine-tunes until full fine-tuning has plateaued on the legal
domains (`legal_steps`), so legal impact measures lost ability, not slower learning. Curve cells evaluate their
users at several step budgets of one run. A finished cell is cached as JSON with the settings it depends on."""

from __future__ import annotations

import copy
import dataclasses
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


def prepare_setting(name: str, seed: int, profile: BenchProfile, out: Path, base_loader: Any,
                    base: dict[str, str] | None = None) -> Setting:
    """`base` identifies what `base_loader` loads (`zoo.base_identity`) where it is a shipped base."""
    from ..model import DiffusionModel
    from . import emoji, relearn

    base_name, form = scenario_form(name)
    sc = emoji.scenario(base_name, seed)
    if form == "relearn":
        dirs = relearn.prepare(sc, base_loader, out / "relearn" / f"{base_name}-seed{seed}", profile.relearn,
                               base=base)

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
        publisher_legal=data(("legal_near", "publisher"), *[("legal_far", "publisher")] * profile.publisher_legal_far_repeat),
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
# Settings that change what the protections learn from but not the users: a cell depends on them only when its
# protection reads the publisher's data (not full fine-tuning or the base).
PUBLISHER_SETTINGS = ("publisher_legal_far_repeat",)


def cell_settings(profile: BenchProfile, method: str | None = None, attack: str = "default",
                  base: dict[str, str] | None = None, split: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a cached cell depends on besides its key: a rerun with other settings must not reuse it. Every
    cell depends on the users, the evaluation and the release recipe; a protection's cell also on the config
    of each of its stages (`protection`), so a new learner config reruns the guard's cells and reuses the
    baselines'; a cell of a scenario that starts from another shipped base than the default on that base
    (`zoo.base_identity`); a cell of a scenario whose split changed once, on its split (`emoji.split_identity`).
    Without `method`: the settings every cell shares."""
    from ..protections import config_dict, configs_for

    d = json.loads(json.dumps(profile.to_dict()))  # as it will read back from a cell
    out = {k: d[k] for k in COMMON_SETTINGS}
    if method is not None and method not in ("base", "none"):
        out.update({k: d[k] for k in PUBLISHER_SETTINGS if d[k] != 1})
    if method is not None and method != "base":
        out["protection"] = json.loads(json.dumps(
            {stage: config_dict(cfg) for stage, cfg in configs_for(method, profile.typed_options()).items()}))
    if attack != "default":
        out["attack"] = profile_attack(profile, attack).to_dict()
    if base is not None:
        out["base"] = dict(base)
    if split is not None:
        out["split"] = dict(split)
    return out


def profile_attack(profile: BenchProfile, attack: str) -> Any:
    """A battery attack rebased on the profile's default attacker (its steps, rate and batch), so each attack
    stays one change from the default user whatever the profile's budget."""
    from ..attacks import DEFAULT, get_attack

    return get_attack(attack).config.scaled_to(DEFAULT, steps=profile.steps, lr=profile.lr,
                                                batch_size=profile.batch_size)


def settings_differ(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The settings in which a cell recorded with `recorded` is not one made with `wanted`. A field that a
    protection stage's config gained after the cell was recorded counts as equal when `wanted` holds its
    default: a new config field must default to the behaviour before it (so measured cells stay valid)."""
    from ..protections import PROTECTIONS, config_dict

    diff = []
    for key, value in wanted.items():
        theirs = recorded.get(key)
        if key == "protection" and isinstance(theirs, dict) and isinstance(value, dict) and set(theirs) == set(value):
            for stage, cfg in value.items():
                default = json.loads(json.dumps(config_dict(PROTECTIONS[stage].config(None))))
                rec = theirs[stage]
                if not isinstance(rec, dict) or set(rec) - set(cfg) or any(
                        rec.get(f, default.get(f)) != v for f, v in cfg.items()):
                    diff.append(f"protection.{stage}")
        elif theirs != value:
            diff.append(key)
    return sorted(diff)


def load_cell(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """A cached cell, if it was made with `settings` (a cell may record more settings than its method reads:
    cells written before settings were per method recorded every section)."""
    cell = json.loads(path.read_text())
    theirs = cell.get("settings") or {}
    if not theirs or settings_differ(theirs, settings):
        diff = settings_differ(theirs, settings)
        raise ValueError(f"{path}: cached with other settings ({', '.join(diff) or 'none recorded'}); "
                         f"use another --out directory, or delete {path.name} (and, for a protection's cell, the "
                         f"folder work/{path.stem.split('--')[0]}, which its attacks share) to recompute it")
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


def protected_words(setting: Setting) -> list[str]:
    """What the scenario's captions call the protected concepts: the figures' family names, the style's name."""
    base, _ = scenario_form(setting.name)
    return ["openmoji"] if base == "artstyle" else list(setting.scenario.illegal)


def publisher_captions(setting: Setting) -> list[str]:
    sc = setting.scenario
    return [it.caption for d in ("illegal", "legal_near", "legal_far") for it in sc.items(d, "publisher")]


def released(setting: Setting, profile: BenchProfile, method: str, ratio: float | None, work: Path) -> tuple[Any, Any, dict[str, Any], float]:
    """The release of `method` at `ratio` on the setting: (model, guard, info, seconds to make it). Made once
    per setting and kept in work/release/ (model and guard), so every attack on it fine-tunes the same
    release; `work` is also the protection's own output directory (a guard learner's resumable run)."""
    import shutil

    from ..guard import Guard
    from ..model import DiffusionModel
    from ..protections import ReleaseContext, protect
    from ..protections.registry import configs_for, stages
    from ..utils.files import atomic_write_json, read_json

    kept = work / "release"
    settings = json.loads(json.dumps(cell_settings(profile, method)))
    if (kept / "info.json").is_file():
        record = read_json(kept / "info.json", "kept release")
        # made with another recipe, or before releases recorded one (a config field added since, at its default,
        # is the same recipe: as for cells)
        if not record.get("settings") or settings_differ(record["settings"], settings):
            log.info("  the kept release in %s was made with other settings: making it again", kept)
            shutil.rmtree(kept)
    if (kept / "info.json").is_file():
        model = DiffusionModel.from_pretrained(kept / "model", torch_dtype=torch.float32)
        guard = Guard.load(kept / "guard.json") if (kept / "guard.json").is_file() else None
        log.info("  the release of %s is kept from an earlier cell (%s)", method, kept)
        return model, guard, record["info"], record["seconds"]
    if "immunise" in stages(method):  # an unfinished immunisation of another recipe is of no use to this one
        from ..protections.immunise import discard_other_checkpoint

        if discard_other_checkpoint(work, configs_for(method, profile.typed_options())["immunise"]):
            log.info("  an unfinished immunisation in %s had other settings: starting it again", work)
    t0 = time.perf_counter()
    log.info("  releasing with %s%s", method, "" if ratio is None else f" at ratio {ratio:g}")
    ctx = ReleaseContext(setting.load_release(), setting.publisher_illegal, setting.publisher_legal, ratio or 0.0,
                         setting.seed, work, profile.ratio_by, prompts=setting.uce)
    rel = protect(method, ctx, profile.typed_options())
    seconds = time.perf_counter() - t0
    kept.mkdir(parents=True, exist_ok=True)
    rel.model.save_pretrained(kept / "model", overwrite=True)
    if rel.guard is not None:
        rel.guard.save(kept / "guard.json")
        rel.guard.save(work / "guard.json")
    atomic_write_json(kept / "info.json", {"info": rel.info, "seconds": seconds, "settings": settings})
    return rel.model, rel.guard, rel.info, seconds


def _scorer(setting: Setting, profile: BenchProfile, recogniser: Any, model: Any, domains: dict[str, Any],
            budget: int, last: int, user: str, result_domains: dict[str, Any], points: list[dict[str, Any]],
            work: Path | None = None, keep_images: int = 0) -> Any:
    """A checkpoint callback's scoring function: evaluate `model` on `domains` at a step (`n` samples), record
    the point, and at `budget` the cell's metrics (and the first images, with `keep_images`)."""
    def score(step: int, n: int) -> None:
        for d, domain in domains.items():
            metrics, images = evaluate(model, domain, recogniser, n_samples=n, seed=setting.seed,
                                       sampling=profile.sampling)
            log.info("  %s user, step %d/%d: %s %.1f%% (%d samples)", user, step, last, d, 100 * metrics["rate"], n)
            points.append({"step": step, "domain": d, "rate": metrics["rate"], "mean_prob": metrics["mean_prob"],
                           "n": metrics["n"]})
            if step == budget:
                result_domains[d] = metrics
                if keep_images and work is not None:
                    from safetensors.torch import save_file

                    work.mkdir(parents=True, exist_ok=True)
                    save_file({"images": images[:keep_images].contiguous()}, str(work / f"samples-{d}.safetensors"))
    return score


def run_cell(setting: Setting, profile: BenchProfile, method: str, ratio: float | None, recogniser: Any, work: Path,
             *, curve: bool = False, keep_images: int = 0) -> dict[str, Any]:
    """Release with `method` at `ratio`, let both users fine-tune it, evaluate. With `keep_images`, the first
    images of each domain at the user's budget are written to work/samples-<domain>.safetensors."""
    from ..finetuning import FinetuneConfig, finetune

    t0 = time.perf_counter()
    model, guard, info, t_release = released(setting, profile, method, ratio, work)
    result: dict[str, Any] = {"scenario": setting.name, "form": setting.form, "seed": setting.seed, "method": method,
                              "ratio": ratio, "curve": curve, "guard": guard.summary() if guard else None,
                              "release_info": info, "release_seconds": t_release, "domains": {}, "curves": {},
                              "finetune_seconds": {}}
    for user, data in setting.users.items():
        budgets = user_budgets(profile, user, curve)
        budget = profile.steps if user == "illegal" else profile.legal_steps
        tuned = copy.deepcopy(model)
        points: list[dict[str, Any]] = []
        domains = {d: setting.domains[d] for d in USER_DOMAINS[user] if d in setting.domains}
        score = _scorer(setting, profile, recogniser, tuned, domains, budget, max(budgets), user, result["domains"],
                        points, work, keep_images)
        cfg = FinetuneConfig(method="full", train=TrainConfig(max_steps=max(budgets), batch_size=profile.batch_size,
                                                              learning_rate=profile.lr, seed=setting.seed,
                                                              progress=True))
        t1 = time.perf_counter()
        log.info("  %s user: %d fine-tuning steps, evaluated at %s", user, max(budgets), sorted(budgets))
        finetune(tuned, data, guard=guard, config=cfg, callbacks=[_Checkpoints(budgets, score)])
        result["finetune_seconds"][user] = time.perf_counter() - t1
        result["curves"][user] = points
    result["seconds"] = time.perf_counter() - t0
    return result


def run_attack_cell(setting: Setting, profile: BenchProfile, method: str, ratio: float | None, attack: str,
                    recogniser: Any, work: Path) -> dict[str, Any]:
    """The release of `method` at `ratio` under a battery attack: the illegal user fine-tunes it with the
    attack's recipe (its data, captions, method, optimizer, rate, schedule and budget) and is judged on the
    protected prompts in its own words; where the recipe changes what a legal user would do (rate, optimizer,
    LoRA), a legal user with that recipe is measured too. Full fine-tuning of the same release under the same
    attack (method `none`) is the cell's reference in the summary."""
    from ..attacks.run import attack_data, run_attack

    cfg = profile_attack(profile, attack)
    default = profile_attack(profile, "default")
    t0 = time.perf_counter()
    model, guard, info, t_release = released(setting, profile, method, ratio, work)
    result: dict[str, Any] = {"scenario": setting.name, "form": setting.form, "seed": setting.seed, "method": method,
                              "ratio": ratio, "attack": attack, "attack_config": cfg.to_dict(),
                              "guard": guard.summary() if guard else None, "release_seconds": t_release,
                              "domains": {}, "curves": {}, "finetune_seconds": {}, "names": {}}
    words = protected_words(setting)
    data, names = attack_data(cfg, setting.users["illegal"], setting.users["legal"], seed=setting.seed,
                              concepts=words, publisher_captions=publisher_captions(setting))
    from ..attacks.captions import recaptioner

    rewrite = recaptioner(names)
    illegal = setting.domains["illegal"]
    domains = {"illegal": dataclasses.replace(illegal, prompts=[rewrite(p) for p in illegal.prompts])}
    result["names"] = {c: n for c, n in names.items() if c != n}
    result["prompts_sample"] = domains["illegal"].prompts[:3]
    users = [("illegal", data, cfg.steps, domains)]
    if cfg.data != "benign" and cfg.method != "textual-inversion" and cfg.changes_the_legal_user(default):
        legal = {d: setting.domains[d] for d in USER_DOMAINS["legal"] if d in setting.domains}
        users.append(("legal", setting.users["legal"], profile.legal_steps, legal))
    for user, user_data, budget, doms in users:
        points: list[dict[str, Any]] = []
        budgets = {budget: profile.n_samples}
        if user == "illegal":
            budgets.update({s: profile.curve_samples for s in cfg.curve if s < budget})
        budgets = dict(sorted(budgets.items()))
        tuned = copy.deepcopy(model)
        score = _scorer(setting, profile, recogniser, tuned, doms, budget, budget, f"{attack}: {user}",
                        result["domains"], points)
        log.info("  %s user under %s: %d steps, evaluated at %s", user, attack, budget, sorted(budgets))
        t1 = time.perf_counter()
        run_attack(tuned, guard, cfg, user_data, seed=setting.seed, steps=budget,
                   callbacks=[_Checkpoints(budgets, score)], names=names)
        result["finetune_seconds"][user] = time.perf_counter() - t1
        result["curves"][user] = points
    result["seconds"] = time.perf_counter() - t0
    return result


def describe_cell(cell: dict[str, Any]) -> str:
    if cell["method"] == "base":
        return "; ".join(f"{which}: " + ", ".join(f"{d} {100 * m['rate']:.1f}%" for d, m in doms.items())
                         for which, doms in cell["models"].items())
    return ", ".join(f"{d} {100 * m['rate']:.1f}%" for d, m in cell["domains"].items())
