"""The attack battery in the report: the headline naming the best worst case, the per-attack table and the
per-attack plot. The figures themselves are `summary.battery_summary`'s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..utils.images import label_lines
from .evaluate import VALID_LEARNED
from .goals import GOALS


def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _label(method: str, ratio: float | None) -> str:
    return method + ("" if ratio is None else f"@{ratio:g}")


def headline(battery: dict[str, Any]) -> str:
    """One sentence naming the protection whose worst case is highest, and saying plainly when it is small."""
    best = battery.get("best_worst_case")
    if best is None:
        return "No protection has a measured worst case yet (the battery has not run on a valid setting)."
    text = (f"The highest worst case over the battery is {_label(best['method'], best['ratio'])}'s: "
            f"{_p(best['worst_mitigation'])} mitigation, under `{best['worst_attack']}` "
            f"(against {_p(best['default_mitigation'])} under the default attacker)")
    if best["worst_mitigation"] < GOALS.worst_case_mitigation:
        text += (f"; that is below the {GOALS.worst_case_mitigation:.0%} worst-case goal: no protection measured "
                 "here holds against the strongest attacker the guarded path lets through")
    return text + "."


def battery_lines(battery: dict[str, Any]) -> list[str]:
    if not battery["rows"] or not battery["worst_case"]:
        return ["No attack battery in this run (the profile's `attacks` lists only the default attacker).", ""]
    attacks = list(dict.fromkeys(r["attack"] for r in battery["rows"]))
    methods = list(dict.fromkeys((r["scenario"], r["method"], r["ratio"]) for r in battery["rows"]))
    lines = [headline(battery), "",
             "Mitigation per attack (mean over seeds; in brackets each seed), against full fine-tuning of the same "
             "release under the same attack. *void*: full fine-tuning under that attack stays below "
             f"{VALID_LEARNED:.0%} on the protected concepts, so there is nothing to mitigate (its rates are "
             "still shown: the protected rate of a benign fine-tune is concept resurgence).", "",
             "| attack | " + " | ".join(f"{sc}: {_label(m, q)}" for sc, m, q in methods) + " | full fine-tuning's illegal rate |",
             "|---|" + "---|" * len(methods) + "---|"]
    for attack in attacks:
        cells, full = [], None
        for sc, m, q in methods:
            r = next((r for r in battery["rows"] if (r["scenario"], r["method"], r["ratio"], r["attack"]) == (sc, m, q, attack)), None)
            if r is None:
                cells.append("")
                continue
            full = full if full is not None else r["full_illegal"]
            seeds = ", ".join(f"{100 * v:.0f}" for v in r["mitigation_per_seed"])
            if r["mitigation"] is None and not r["void"]:
                cells.append("reference not computed yet")
                continue
            cells.append(f"void (illegal {_p(r['illegal'])})" if r["void"] else
                         f"{_p(r['mitigation'])} ({seeds})" + (f", void on seed {r['void_seeds']}" if r["void_seeds"] else ""))
        reference = any(r["reference"] for r in battery["rows"] if r["attack"] == attack)
        label = f"`{attack}` (reference, outside the path)" if reference else f"`{attack}`"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_p(full)} |")
    changed = [r for r in battery["rows"] if r["attack"] != "default"
               and (r["legal_impact_near"] is not None or r["legal_impact_far"] is not None)]
    if changed:
        lines += ["", "Legal impact under the attacks that change what a legal user would do (its rate, optimizer or "
                  "LoRA): the release's legal user against full fine-tuning's, both with that recipe, near / far "
                  f"(the goals: at most {GOALS.legal_near:.0%} / {GOALS.legal_far:.0%}):", "",
                  "| attack | " + " | ".join(f"{sc}: {_label(m, q)}" for sc, m, q in methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for attack in dict.fromkeys(r["attack"] for r in changed):
            cells = []
            for sc, m, q in methods:
                r = next((r for r in changed if (r["scenario"], r["method"], r["ratio"], r["attack"]) == (sc, m, q, attack)), None)
                cells.append("" if r is None else f"{_p(r['legal_impact_near'])} / {_p(r['legal_impact_far'])}")
            lines.append(f"| `{attack}` | " + " | ".join(cells) + " |")
    lines += ["", "Worst case per protection (the lowest mean mitigation over the attacks of the publisher's path that "
              "are not void; a reference attack such as textual inversion, which a UNet guard cannot stop by design, "
              "is shown above and left out of it):", "",
              "| scenario | protection | default attacker | worst case | worst attack | lowest seed under it | void attacks |",
              "|---|---|---|---|---|---|---|"]
    for w in battery["worst_case"]:
        lines.append(f"| {w['scenario']} | {_label(w['method'], w['ratio'])} | {_p(w['default_mitigation'])} | "
                     f"**{_p(w['worst_mitigation'])}** | `{w['worst_attack']}` | {_p(w['worst_per_seed'])} | "
                     f"{', '.join(w['attacks_void']) or 'none'} |")
    return lines + ["", "![mitigation per attack](attacks.png)", "",
                    "Where each protection stands: its default attacker's mitigation (hollow) and its worst case over the "
                    "battery (filled), against its legal user's impact under the default attacker; the goal is the "
                    "shaded box.", "", "![worst case against the default attacker](worst-case.png)", ""]


def plot_battery(battery: dict[str, Any], path: Path) -> None:
    """Mitigation per attack, one group of bars per protection (void attacks left empty, marked 'v')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = battery["rows"]
    methods = list(dict.fromkeys((r["scenario"], r["method"], r["ratio"]) for r in rows)) or [("", "(none)", None)]
    attacks = list(dict.fromkeys(r["attack"] for r in rows)) or ["default"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.28 * len(methods) * len(attacks)), 4.6))
    width = 0.8 / len(attacks)
    cmap = plt.get_cmap("tab20")
    for j, attack in enumerate(attacks):
        for i, key in enumerate(methods):
            r = next((r for r in rows if (r["scenario"], r["method"], r["ratio"], r["attack"]) == (*key, attack)), None)
            x = i + (j - (len(attacks) - 1) / 2) * width
            if r is None:
                continue
            if r["void"]:
                ax.text(x, 0.01, "v", ha="center", fontsize=6, color="grey")
            elif r["mitigation"] is not None:
                ax.bar(x, r["mitigation"], width, color=cmap(j % 20), label=attack if i == 0 else None)
    ax.axhline(GOALS.mitigation, color="green", lw=0.8, ls="--", label=f"default-attacker goal ({GOALS.mitigation:.0%})")
    ax.axhline(GOALS.worst_case_mitigation, color="green", lw=0.8, ls=":",
               label=f"worst-case goal ({GOALS.worst_case_mitigation:.0%})")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(range(len(methods)), ["\n".join([sc, *label_lines(_label(m, q), 3)]) for sc, m, q in methods],
                  fontsize=7)
    ax.set_ylabel("mitigation (vs full fine-tuning, same attack)")
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.0)
    ax.set_title("Mitigation per attack\n('v': void, full fine-tuning did not relearn)", fontsize=10)
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: The battery's worst cases as the package ships them, for reports that cannot run the battery (the demo):
#: derived from the committed battery results by `recorded_worst_cases` (regenerate with
#: `freezeasguard bench-report docs/attacks-results.json --battery-record src/freezeasguard/bench/recorded-battery.json`).
RECORDED_BATTERY = Path(__file__).with_name("recorded-battery.json")


def recorded_worst_cases(results: dict[str, Any], source: str) -> dict[str, Any]:
    """What a report quotes of a bench's battery without running it: per protection the default attacker's and
    the worst case's mitigation, the attack behind the worst, and how much of the battery they rest on."""
    battery = results["summary"]["battery"]
    profile = results.get("profile") or {}
    seeds = sorted({c["seed"] for c in results["cells"].values()})
    attacks = [a for a in profile.get("attacks", []) if a != "default"]
    return {"source": source, "seeds": seeds, "battery_attacks": len(attacks),
            "worst_case": [{k: w[k] for k in ("scenario", "method", "ratio", "default_mitigation", "worst_mitigation",
                                              "worst_attack", "attacks_measured")} for w in battery["worst_case"]]}


def recorded_battery() -> dict[str, Any]:
    """The shipped record (`RECORDED_BATTERY`)."""
    return json.loads(RECORDED_BATTERY.read_text())


def recorded_lines(record: dict[str, Any], methods: list[tuple[str, float | None]] | None = None) -> list[str]:
    """Markdown lines quoting the shipped record, labelled as recorded (not measured by the run quoting it)."""
    rows = [w for w in record["worst_case"] if methods is None or (w["method"], w["ratio"]) in methods]
    if not rows:
        return []
    lines = [f"Recorded, not measured by this run: the attack battery (`freezeasguard bench --profile attacks`, "
             f"{record['source']}, seed(s) {', '.join(map(str, record['seeds']))}; each protection's figures rest on "
             f"the attacks measured so far of the battery's {record['battery_attacks']}).", "",
             "| protection | default attacker | worst case | worst attack | attacks measured |", "|---|---|---|---|---|"]
    lines += [f"| {_label(w['method'], w['ratio'])} | {_p(w['default_mitigation'])} | **{_p(w['worst_mitigation'])}** | "
              f"`{w['worst_attack']}` | {w['attacks_measured']} |" for w in rows]
    return lines + [""]


def default_attacker_only(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The summary rows of protections measured under the default attacker alone (a variant screened and stopped
    there): no worst case, but their default mitigation bounds it from above, so the worst-case plot shows them."""
    in_battery = {(w["scenario"], w["method"], w["ratio"]) for w in summary["battery"]["worst_case"]}
    return [r for r in summary["table"] if (r["scenario"], r["method"], r["ratio"]) not in in_battery
            and r["method"] != "none" and r.get("mitigation") is not None]


def plot_worst_case_frontier(summary: dict[str, Any], path: Path) -> None:
    """Mitigation against legal impact (near, far), a protection per colour: the default attacker's point
    (hollow) joined to the battery's worst case (filled, labelled with its attack), or a hollow triangle where
    only the default attacker ran; the worst-case goal box shaded, the default attacker's goal dashed."""
    from ..utils.plots import axes_grid, goal_panel

    worst = [w for w in summary["battery"]["worst_case"] if w["worst_mitigation"] is not None]
    table = {(r["scenario"], r["method"], r["ratio"]): r for r in summary["table"]}
    default_only = default_attacker_only(summary)
    legend_rows = (2 * len(worst) + len(default_only) + 2 + 1) // 2
    height = 4.6 + 0.18 * legend_rows
    plt, fig, axes = axes_grid(1, 2, (6.0, height))
    colours = plt.get_cmap("tab10")
    for col, (impact, goal, label) in enumerate((("legal_impact_near", GOALS.legal_near, "legal-near"),
                                                 ("legal_impact_far", GOALS.legal_far, "legal-far"))):
        ax = axes[0][col]
        for i, w in enumerate(worst):
            row = table.get((w["scenario"], w["method"], w["ratio"]))
            x = None if row is None else row.get(impact)
            if x is None or w["default_mitigation"] is None:
                continue
            c = colours(i % 10)
            name = f"{w['scenario']}: {_label(w['method'], w['ratio'])}"
            ax.plot([x, x], [w["default_mitigation"], w["worst_mitigation"]], color=c, lw=1.2)
            ax.plot([x], [w["default_mitigation"]], marker="o", mfc="none", color=c, label=f"{name} (default)")
            ax.plot([x], [w["worst_mitigation"]], marker="o", color=c, label=f"{name} (worst)")
            ax.annotate(w["worst_attack"], (x, w["worst_mitigation"]), fontsize=7, xytext=(4, -8),
                        textcoords="offset points")
        for j, r in enumerate(default_only, start=len(worst)):
            if r.get(impact) is None:
                continue
            ax.plot([r[impact]], [r["mitigation"]], marker="v", mfc="none", color=colours(j % 10),
                    label=f"{r['scenario']}: {_label(r['method'], r['ratio'])} (default attacker only: worst <= this)")
        ax.axhline(GOALS.mitigation, color="green", lw=0.8, ls="--",
                   label=f"default-attacker goal ({GOALS.mitigation:.0%})")
        goal_panel(ax, goal_x=goal, goal_y=GOALS.worst_case_mitigation, x_max=0.5,
                   goal_label=f"worst-case goal ({GOALS.worst_case_mitigation:.0%})",
                   xlabel=f"legal impact on {label}, default attacker (lower is better)",
                   title=f"default attacker vs worst case: {label}")
    # Below the panels: with a handful of variants a legend inside would cover their points.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, (0.18 * legend_rows + 0.15) / height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
