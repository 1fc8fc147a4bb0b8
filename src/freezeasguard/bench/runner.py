"""`freezeasguard bench`: a profile's settings x cells, resumable, then the report.

The run owns its output directory (`utils.files.claim_output_dir`). Cells are computed seed-major (an
interrupted bench has covered every scenario for the first seeds), the validity cells of a setting first, and
each finished cell is written at once, so a rerun continues where the last one stopped. Cells of other runs
can be reused (`reuse_from`) under the same settings check as the run's own cache, and a report can be made
over the cells of several runs (`report_runs`) without computing anything.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ..utils.files import atomic_write_json, atomic_write_text
from .battery import plot_battery, plot_worst_case_frontier
from .cells import (
    cell_settings,
    describe_cell,
    load_cell,
    prepare_setting,
    run_attack_cell,
    run_base_cell,
    run_cell,
    settings_differ,
)
from .profiles import FORMER_NAMES, BenchProfile, cell_key, planned_attack_cells, planned_cells, scenario_form
from .report import markdown, plot_curves, plot_frontier, plot_samples
from .summary import VALIDITY_METHODS, setting_is_void, summarise

log = logging.getLogger(__name__)

BENCH_PRODUCTS = ("cells", "work", "relearn", "results.json", "results.md", "frontier.png", "curves.png",
                  "attacks.png", "worst-case.png", "samples")


def run_bench(out: str | Path, profile: BenchProfile, *, model_loader: Any = None, recogniser: Any = None,
              command: str | None = None, report_only: bool = False, overwrite: bool = False,
              claim_as: str = "bench", extra_products: tuple[str, ...] = (),
              reuse_from: list[str | Path] | tuple[str | Path, ...] = ()) -> dict[str, Any]:
    """Run (or resume) the grid into `out` and write the report. With `report_only`, nothing is computed: the
    report covers the cells cached so far and lists the missing ones. `reuse_from`: other bench output
    directories whose cells (and their work folders) are copied in where this run lacks them and their
    settings are this profile's.

    The run owns `out`: another run on it at the same time fails at once, and a directory of a run with other
    cell settings is refused unless `overwrite`. A report-only run takes no claim: it computes nothing and
    rewrites only the report files."""
    from ..utils.files import claim_output_dir

    profile.validate()
    out = Path(out)
    identity = {"cell_settings": cell_settings(profile)}
    with claim_output_dir(None if report_only else out, claim_as, identity, BENCH_PRODUCTS + extra_products,
                          overwrite=overwrite):
        if reuse_from and not report_only:
            reuse_cells(out, profile, reuse_from)
        return _run_bench(out, profile, model_loader=model_loader, recogniser=recogniser, command=command,
                          report_only=report_only)


def scenario_base(name: str) -> dict[str, str] | None:
    """The shipped base a scenario's cells start from where it is not the default (None for the default, so
    that every cell recorded before there were two bases keeps its settings)."""
    return _base_of(name)[1]


def _split(name: str) -> dict[str, object] | None:
    """The scenario's split identity (`emoji.split_identity`), which its cells record."""
    from .emoji import split_identity

    return split_identity(scenario_form(name)[0])


def _base_of(name: str) -> tuple[str, dict[str, str] | None]:
    """A scenario's shipped base: its name, and its identity as `scenario_base` gives it."""
    from .. import zoo

    base = zoo.base_for_scenario(*scenario_form(name))
    return base, None if base == zoo.EMBEDDED else zoo.base_identity(base)


def _planned_keys(profile: BenchProfile, name: str, seed: int) -> dict[str, tuple[str, float | None, bool, str]]:
    """Every cell of a setting: key -> (method, ratio, curve, attack), the default attacker's cells first."""
    plan = [("base", None, False, "default")] + [(m, r, c, "default") for m, r, c in planned_cells(profile)]
    plan += [(m, r, False, a) for m, r, a in planned_attack_cells(profile)]
    return {cell_key(name, seed, m, r, a): (m, r, c, a) for m, r, c, a in plan}


def _shipped_settings(profile: BenchProfile, name: str, method: str, attack: str) -> dict[str, Any]:
    """The settings of a cell of scenario `name` made on the shipped bases (what another run's cells must match)."""
    return cell_settings(profile, method, attack, scenario_base(name), _split(name))


def _serves(cell: dict[str, Any], curve: bool) -> bool:
    """Whether a measured cell serves a plan: not when the plan asks for a learning curve that the cell was run
    without (its settings match, as the curve adds points and changes none)."""
    return bool(cell.get("curve")) or not curve


def _holds(path: Path, curve: bool) -> bool:
    """Whether a run already holds a cell that serves the plan (one lacking the curve asked for is as good as
    absent: a source's curved cell may replace it)."""
    return path.exists() and _serves(json.loads(path.read_text()), curve)


def reuse_cells(out: Path, profile: BenchProfile, sources: list[str | Path] | tuple[str | Path, ...]) -> list[str]:
    """Copy into `out` the cells of `sources` (bench output directories) that this profile plans, that `out`
    lacks, and whose recorded settings are this profile's; returns their keys. A cell with other settings is
    not copied (and said so), as the run's own cache would refuse it. A source's relearn models (the taught
    base and its release) are copied too where their recipe is this profile's, so they are not rebuilt."""
    from .relearn import recipe_of

    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for src in sources:
        src = Path(src)
        if src.is_file():
            copied += _reuse_recorded_cells(cells_dir, profile, src)
            continue
        if not (src / "cells").is_dir():
            raise ValueError(f"--reuse {src}: not a bench output directory (no cells/ folder) nor a results.json")
        for seed in profile.seeds:
            for name in profile.scenarios:
                base_name, form = scenario_form(name)
                cache = Path("relearn") / f"{base_name}-seed{seed}"
                if form == "relearn" and (src / cache / "info.json").is_file() and not (out / cache).exists():
                    recorded = json.loads((src / cache / "info.json").read_text()).get("recipe")
                    wanted = recipe_of(base_name, seed, profile.relearn, scenario_base(name))
                    if recorded == json.loads(json.dumps(wanted)):
                        shutil.copytree(src / cache, out / cache)
                        log.info("bench: reused the relearn models of %s seed %d from %s", base_name, seed, src)
                for key, (method, _, curve, attack) in _planned_keys(profile, name, seed).items():
                    theirs, mine = src / "cells" / f"{key}.json", cells_dir / f"{key}.json"
                    if _holds(mine, curve) or not theirs.exists():
                        continue
                    try:
                        cell = load_cell(theirs, _shipped_settings(profile, name, method, attack))
                    except ValueError as e:
                        log.info("bench: not reusing %s: %s", key, e)
                        continue
                    # the release (work/) serves whatever the cell lacks: the recompute of a curve starts from it
                    if (src / "work" / key).is_dir() and not (out / "work" / key).exists():
                        shutil.copytree(src / "work" / key, out / "work" / key)
                    if not _serves(cell, curve):
                        log.info("bench: not reusing %s from %s: run without the learning curve asked for (its "
                                 "release is)", key, src)
                        continue
                    atomic_write_json(mine, cell)
                    copied.append(key)
                    log.info("bench: reused %s from %s", key, src)
    return copied


def _reuse_recorded_cells(cells_dir: Path, profile: BenchProfile, results: Path) -> list[str]:
    """The cells of a results.json (a bench's report, such as the one committed in docs/) that this profile
    plans, that the run lacks and whose settings are this profile's. Only the measured cells come across: the
    relearn models and the releases are rebuilt from their recipes where a cell still to compute needs them.
    This is what lets a battery too long for one sitting on a fresh machine continue from its recorded cells."""
    theirs, _ = read_cells(results)
    copied = []
    for seed in profile.seeds:
        for name in profile.scenarios:
            for key, (method, _, curve, attack) in _planned_keys(profile, name, seed).items():
                mine = cells_dir / f"{key}.json"
                if _holds(mine, curve) or key not in theirs:
                    continue
                recorded = theirs[key].get("settings") or {}
                if not recorded or settings_differ(recorded, _shipped_settings(profile, name, method, attack)):
                    log.info("bench: not reusing %s from %s: recorded with other settings", key, results)
                    continue
                if not _serves(theirs[key], curve):
                    log.info("bench: not reusing %s from %s: run without the learning curve asked for", key, results)
                    continue
                atomic_write_json(mine, theirs[key])
                copied.append(key)
                log.info("bench: reused %s from %s", key, results)
    return copied


def _run_bench(out: Path, profile: BenchProfile, *, model_loader: Any, recogniser: Any, command: str | None,
               report_only: bool) -> dict[str, Any]:
    from .. import zoo

    cells_dir = out / "cells"
    if not report_only:
        cells_dir.mkdir(parents=True, exist_ok=True)
    rec = recogniser or zoo.load_recogniser()
    cells: dict[str, Any] = {}
    missing_cells: list[str] = []
    skipped_void: list[str] = []
    total = len(profile.seeds) * len(profile.scenarios) * len(_planned_keys(profile, profile.scenarios[0], 0))
    done = 0
    for seed in profile.seeds:
        for name in profile.scenarios:
            keys = _planned_keys(profile, name, seed)
            zoo_base, base = _base_of(name) if model_loader is None else (None, None)
            split = _split(name)
            cached = {k: load_cell(cells_dir / f"{k}.json", cell_settings(profile, keys[k][0], keys[k][3], base, split))
                      for k in keys if (cells_dir / f"{k}.json").exists()}
            if not report_only:
                for k in [k for k, cell in cached.items() if not _serves(cell, keys[k][2])]:
                    log.info("bench: %s was run without the learning curve this profile asks for; recomputing its "
                             "users (from its release, where work/ kept it)", k)
                    del cached[k]
            cells.update(cached)
            done += len(cached)
            todo = [k for k in keys if k not in cached]
            if report_only:
                void = profile.skip_void and setting_is_void(cells, name, seed)
                for k in todo:
                    validity_cell = keys[k][0] in VALIDITY_METHODS and keys[k][3] == "default"
                    (skipped_void if void and not validity_cell else missing_cells).append(k)
                continue
            if not todo:
                continue
            log.info("bench: preparing setting %s seed %d (the taught base and its release, cached under %s)",
                     name, seed, out / "relearn")
            if model_loader is not None:
                setting = prepare_setting(name, seed, profile, out, model_loader)
            else:
                loader = functools.partial(zoo.load_base, zoo_base)
                setting = prepare_setting(name, seed, profile, out, loader, base)
            # the validity cells first (base, full fine-tuning), so a void setting is known before the rest
            # then the battery attack by attack (each attack's rows complete before the next starts), full
            # fine-tuning's reference first within each
            attack_order = {a: i for i, a in enumerate(profile.attacks)}
            todo.sort(key=lambda k: (not (keys[k][0] in VALIDITY_METHODS and keys[k][3] == "default"),
                                     keys[k][3] != "default", attack_order.get(keys[k][3], 0),
                                     keys[k][0] not in VALIDITY_METHODS))
            for key in todo:
                method, ratio, curve, attack = keys[key]
                done += 1
                validity_cell = method in VALIDITY_METHODS and attack == "default"
                if profile.skip_void and not validity_cell and setting_is_void(cells, name, seed):
                    skipped_void.append(key)
                    continue
                log.info("bench: cell %d/%d: %s ...", done, total, key)
                work = out / "work" / cell_key(name, seed, method, ratio)  # one release for every attack
                if method == "base":
                    cell = run_base_cell(setting, profile, rec, None)
                elif attack == "default":
                    cell = run_cell(setting, profile, method, ratio, rec, work, curve=curve,
                                    keep_images=profile.keep_images)
                else:
                    cell = run_attack_cell(setting, profile, method, ratio, attack, rec, work)
                cell["settings"] = cell_settings(profile, method, attack, base, split)
                atomic_write_json(cells_dir / f"{key}.json", cell)
                cells[key] = cell
                log.info("bench: %s done: %s", key, describe_cell(cell))
    summary = summarise(cells, profile)
    summary["missing_cells"] = missing_cells
    summary["skipped_void"] = skipped_void
    write_report(out, profile, cells, summary, command, {k: out / "work" / k for k in cells})
    return summary


def write_report(out: Path, profile: BenchProfile, cells: dict[str, Any], summary: dict[str, Any],
                 command: str | None, folders: dict[str, Path] | None = None) -> None:
    """results.json, results.md and the plots; with `folders` (cell key -> its work folder) also the sample
    grids of the images the cells kept."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {"profile": profile.to_dict(), "cells": cells, "summary": summary})
    plot_frontier(summary, out / "frontier.png")
    plot_curves(summary, out / "curves.png")
    plot_battery(summary["battery"], out / "attacks.png")
    plot_worst_case_frontier(summary, out / "worst-case.png")
    grids = plot_samples(cells, folders or {}, out / "samples")
    text = markdown(summary, cells, profile, command)
    if grids:
        text += ("\n## Samples\n\nThe first images of each cell's evaluation at the user's budget, a row per "
                 "cell (default attacker):\n\n" + "".join(f"![{g[:-4]}](samples/{g})\n" for g in grids))
    atomic_write_text(out / "results.md", text)


def read_cells(source: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The cells of a bench output directory or of a results.json, and the profile it recorded (if any).
    Cells named by a former protection name are renamed (`FORMER_NAMES`)."""
    from ..utils.files import read_json

    source = Path(source)
    profile = None
    if source.is_dir():
        if (source / "results.json").exists():
            profile = read_json(source / "results.json", "bench results").get("profile")
        cells = {p.stem: read_json(p, "bench cell") for p in sorted((source / "cells").glob("*.json"))}
        if not cells and (source / "results.json").exists():
            cells = read_json(source / "results.json", "bench results")["cells"]
    else:
        data = read_json(source, "bench results")
        if not isinstance(data, dict) or "cells" not in data:
            raise ValueError(f"{source}: not a bench results.json (no 'cells')")
        cells, profile = data["cells"], data.get("profile")
    renamed = {}
    for key, cell in cells.items():
        old = cell.get("method")
        if old in FORMER_NAMES:
            cell = {**cell, "method": FORMER_NAMES[old]}
            key = cell_key(cell["scenario"], cell["seed"], cell["method"], cell.get("ratio"), cell.get("attack", "default"))
        renamed[key] = cell
    return renamed, profile


def report_runs(sources: list[str | Path], out: str | Path, *, profile: BenchProfile | None = None,
                command: str | None = None) -> dict[str, Any]:
    """One report over the cells of several runs (output directories or results.json files), computing
    nothing. A source written `PATH=LABEL` reports its protections' cells under LABEL, so variants of one
    protection measured in separate runs (another immunise config, say) stand side by side; its base and full
    fine-tuning cells stay as they are. A cell present in two sources must be the same cell (refused
    otherwise). The profile of the report (its methods' order and text) is `profile`, else the first source's
    recorded one."""
    cells: dict[str, Any] = {}
    folders: dict[str, Path] = {}
    first_profile = None
    for spec in sources:
        src, label = _source_and_label(spec)
        theirs, recorded = read_cells(src)
        first_profile = first_profile or recorded
        for key, cell in theirs.items():
            folder = _work_folder(src, key, cell)
            if label and cell["method"] not in VALIDITY_METHODS:
                cell = {**cell, "method": label, "ratio": cell.get("ratio")}
                key = cell_key(cell["scenario"], cell["seed"], label, cell["ratio"], cell.get("attack", "default"))
            if key in cells and cells[key].get("settings") != cell.get("settings"):
                raise ValueError(f"{src}: cell {key} differs from the one already read, with other settings; "
                                 "report these runs separately, or label the source (PATH=LABEL)")
            if key not in cells:  # the images of a cell come from the run its numbers come from
                cells[key] = cell
                if folder is not None:
                    folders[key] = folder
    if profile is None:
        if first_profile is None:
            raise ValueError("no source recorded its profile: pass one (--config)")
        profile = _profile_from_record(first_profile)
    methods = list(dict.fromkeys(c["method"] for c in cells.values() if c["method"] != "base"))
    profile = profile_with_methods(profile, methods)
    summary = summarise(cells, profile)
    summary["missing_cells"], summary["skipped_void"] = [], []
    write_report(Path(out), profile, cells, summary, command, folders)
    return summary


def _work_folder(src: Path, key: str, cell: dict[str, Any]) -> Path | None:
    """The work folder of a source's cell (its release and kept images), if the source is a run directory that
    has it; a run from before a protection was renamed keeps it under the former name."""
    former = [cell_key(cell["scenario"], cell["seed"], old, cell.get("ratio"), cell.get("attack", "default"))
              for old, new in FORMER_NAMES.items() if new == cell["method"]]
    return next((src / "work" / k for k in [key, *former] if (src / "work" / k).is_dir()), None)


def _source_and_label(spec: str | Path) -> tuple[Path, str | None]:
    text = str(spec)
    path, sep, label = text.rpartition("=")
    if sep and label and not Path(text).exists():
        if "+" in label or "@" in label:
            raise ValueError(f"{text}: a label may not hold '+' or '@'")
        return Path(path), label
    return Path(text), None


def _profile_from_record(data: dict[str, Any]) -> BenchProfile:
    """A profile as a results.json recorded it; fields of an older layout that this one lacks are dropped and
    former protection names renamed (the report only reads the profile's names and budgets)."""
    from dataclasses import fields

    known = {f.name for f in fields(BenchProfile)}
    kept = {k: v for k, v in data.items() if k in known}
    def today(spec: str) -> str:
        method, at, ratio = spec.partition("@")
        return FORMER_NAMES.get(method, method) + at + ratio

    kept["methods"] = [today(m) for m in kept.get("methods", [])]
    kept["curve_cells"] = [today(m) for m in kept.get("curve_cells", [])]
    kept["options"] = {}
    return BenchProfile.from_dict(kept)


def profile_with_methods(profile: BenchProfile, methods: list[str]) -> BenchProfile:
    """`profile` listing every method of `methods` (its own first, in its order): the summary's row order."""
    from dataclasses import replace

    from .profiles import parse_cell

    own = [parse_cell(m)[0] for m in profile.methods]
    return replace(profile, methods=list(dict.fromkeys(own + methods)))
