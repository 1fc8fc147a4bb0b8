"""The bench report: results.md (validity, the derived table with every verdict, the frontier, curves, every
cell), frontier.png and curves.png."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..utils.plots import axes_grid, goal_panel
from .goals import GOALS
from .profiles import FORMS, BenchProfile

log = logging.getLogger(__name__)


def plot_frontier(summary: dict[str, Any], path: Path) -> None:
    """Mitigation vs legal impact (near and far), a line per method over the ratios, the goal box shaded."""
    scenarios = sorted({r["scenario"] for r in summary["table"]}) or ["(no valid setting)"]
    plt, fig, axes = axes_grid(2, len(scenarios), (6.0, 4.6))
    methods = list(dict.fromkeys(r["method"] for r in summary["table"]))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for col, sc in enumerate(scenarios):
        for row, (impact, goal, label) in enumerate((("legal_impact_near", GOALS.legal_near, "legal-near"),
                                                     ("legal_impact_far", GOALS.legal_far, "legal-far"))):
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
            goal_panel(ax, goal_x=goal, goal_y=GOALS.mitigation, x_max=1.0,
                       xlabel=f"legal impact on {label} (lower is better)", title=f"{sc}: mitigation vs {label} impact")
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell_label(row: dict[str, Any]) -> str:
    name = "full fine-tuning" if row["method"] == "none" else row["method"]
    return name + ("" if row["ratio"] is None else f"@{row['ratio']:g}")


SAMPLE_DOMAINS = ("illegal", "legal_near", "legal_far")


def sample_grid(rows: list[tuple[str, Path]], path: Path, *, columns: int = 8) -> bool:
    """A PNG of kept samples, a row per (label, samples file) that exists. A row that cannot be read, or whose
    images differ in size from the first row's, is left out with a warning: a damaged file must not cost the
    report it belongs to. Returns whether a grid was written."""
    import torch
    from safetensors.torch import load_file

    from ..utils.images import save_grid

    images, labels = [], []
    for label, file in rows:
        if not file.is_file():
            continue
        try:
            kept = load_file(str(file))["images"][:columns]
        except Exception as e:  # noqa: BLE001 - any unreadable file: skip its row, say which
            log.warning("sample grid %s: left out %s (%s)", path.name, file, e)
            continue
        if images and kept.shape[1:] != images[0].shape[1:]:
            log.warning("sample grid %s: left out %s (images %s, not %s)", path.name, file,
                        tuple(kept.shape[1:]), tuple(images[0].shape[1:]))
            continue
        images.append(kept)
        labels.append(label)
    if not images:
        return False
    width = min(len(r) for r in images)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(torch.cat([r[:width] for r in images]), path, nrow=width, scale=3, row_labels=labels)
    return True


def plot_samples(cells: dict[str, Any], folders: dict[str, Path], out: Path, *, columns: int = 8) -> list[str]:
    """A PNG per setting and domain, `samples-<scenario>-seed<N>-<domain>.png`, a row per default-attacker cell
    (full fine-tuning first, then by cell key): the first images each cell kept of its evaluation at the
    user's budget (`keep_images`, in `folders[key]`, the cell's work folder). Returns the files written."""
    settings: dict[tuple[str, int], list[tuple[str, dict[str, Any]]]] = {}
    for key, cell in cells.items():
        if cell.get("method") != "base" and cell.get("attack", "default") == "default" and key in folders:
            settings.setdefault((cell["scenario"], cell["seed"]), []).append((key, cell))
    written = []
    for (scenario, seed), members in sorted(settings.items()):
        members.sort(key=lambda kc: (kc[1]["method"] != "none", kc[0]))
        for domain in SAMPLE_DOMAINS:
            name = f"samples-{scenario}-seed{seed}-{domain}.png"
            rows = [(_cell_label(cell), folders[key] / f"samples-{domain}.safetensors") for key, cell in members]
            if sample_grid(rows, out / name, columns=columns):
                written.append(name)
    return written


def plot_curves(summary: dict[str, Any], path: Path) -> None:
    """Recognition vs user steps for every curve cell (illegal user; legal users beside), one row per scenario."""
    scenarios = sorted({r["scenario"] for r in summary["curves"]}) or ["(no curve cells)"]
    plt, fig, axes = axes_grid(len(scenarios), 3, (5.0, 3.8))
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
    battery = summary.get("battery") or {"rows": [], "worst_case": []}
    if battery["worst_case"]:
        from .battery import headline

        lines += [f"**Worst case over the attack battery:** {headline(battery)} (details: *The attack battery*).", ""]
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
              "| worst case over the battery | legal impact near (rate / prob) | legal impact far (rate / prob) "
              "| adv. vs random / UCE | goals | release time |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    worst = {(w["scenario"], w["method"], w["ratio"]): w for w in battery["worst_case"]}
    for r in summary["table"]:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:g}"
        adv = " / ".join("n/a" if r.get(f"advantage_vs_{b}") is None else f"{r[f'advantage_vs_{b}']:.2f}"
                         for b in ("random", "uce"))
        v = r.get("verdict") or {"met": False, "reasons": []}
        goals = "met" if v["met"] else "not met: " + "; ".join(v["reasons"])
        secs = "n/a" if r.get("release_seconds") is None else f"{r['release_seconds']:.0f} s"
        w = worst.get((r["scenario"], r["method"], r["ratio"]))
        worst_text = "not run" if w is None else f"{_p(w['worst_mitigation'])} (`{w['worst_attack']}`)"
        lines.append(
            f"| {r['scenario']} | {r['method']} | {ratio} | {_p(r.get('frozen_tensors'))} / {_p(r.get('frozen_params'))} | "
            f"{_p(r.get('illegal'))} | {_p(r.get('mitigation'))}{_per_seed(r)} | {_p(r.get('mitigation_prob'))} | "
            f"{worst_text} | "
            f"{_p(r.get('legal_impact_near'))} / {_p(r.get('legal_impact_near_prob'))} | "
            f"{_p(r.get('legal_impact_far'))} / {_p(r.get('legal_impact_far_prob'))} | {adv} | {goals} | {secs} |")
    lines += ["", "## The frontier", "",
              f"Goals (docs/benchmark.md): {GOALS.describe()}. The table's *goals* column gives every reason a "
              "row misses them. Margin = mitigation minus the worse legal impact (seed means).", ""]
    for sc, v in summary["frontier"].items():
        best = v["best_within_goals"]
        head = (f"**{sc}**: within the legal-impact goals the highest mitigation is {best['method']}"
                + ("" if best["ratio"] is None else f" at {best['ratio']:g}") + f" ({_p(best['mitigation'])})"
                if best else f"**{sc}**: no method stays within the legal-impact goals")
        per = "; ".join(f"{q}: {m['method']} ({_p(m['margin'])})" for q, m in v["best_margin_per_ratio"].items())
        met = ", ".join(v["goals_met_by"]) or "none"
        lines.append(f"- {head}. Best margin per ratio: {per or 'n/a'}. All goals met by: {met}.")
    lines += ["", "![frontier](frontier.png)", "", "## The attack battery", ""]
    from .battery import battery_lines

    lines += battery_lines(summary.get("battery") or {"rows": [], "worst_case": []})
    lines += ["## Learning curves", ""]
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
