"""Issue 11's fallback figure: where every measured variant stands against random, importance and component
freezing (a research script, run from the repository root). usage: levers_frontier.py [OUT_PREFIX]

Reads every `figures` cell of the quick grid (runs/quick), of its extra ratios (runs/frontier-s*,
benchmarks/probes/frontier_ratios.py) and of the lever probes (runs/probe5/*, benchmarks/probes/lever_probe.py),
keeps the cells made with the quick grid's shared settings (users, evaluation, release recipe; probes that
changed them, such as a longer attack, are left out: they have their own full fine-tune), and scores each
against the grid's full fine-tune of the same seed. Writes OUT_PREFIX.png (mitigation against legal-far and
against legal-near impact, the goal box drawn, seeds as marker shapes) and OUT_PREFIX.json (every point).
Default OUT_PREFIX: docs/levers-frontier."""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from freezeasguard.bench.cells import COMMON_SETTINGS, cell_settings
from freezeasguard.bench.profiles import PROFILES

prefix = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/levers-frontier")
common = {k: v for k, v in cell_settings(PROFILES["quick"]).items() if k in COMMON_SETTINGS}
none = {s: json.loads(Path(f"runs/quick/cells/figures-seed{s}-none.json").read_text())["domains"] for s in (0, 1)}


def family(method: str) -> str:
    if method.startswith("freeze-cross-attention+immunise") or method == "random+immunise":
        return "component or random set + immunised values"
    if "immunise" in method:
        return "learned mask + immunised values"
    if method.startswith("guard"):
        return "learned mask (released values)"
    return "random / importance / component freezing"


points = []
sources = [(p, None) for p in sorted(Path("runs/quick/cells").glob("figures-*.json"))]
sources += [(p, None) for p in sorted(Path("runs").glob("frontier-s*/cells/figures-*.json"))]
sources += [(p, p.parents[1].name) for p in sorted(Path("runs/probe5").glob("*/cells/figures-*.json"))]
seen = set()
for path, probe in sources:  # the grid first: a probe cell later copied into the grid is one point, named by the grid
    cell = json.loads(path.read_text())
    if cell["method"] in ("base", "none") or cell.get("form", "relearn") != "relearn":
        continue
    settings = cell.get("settings") or {}
    if any(settings.get(k) != v for k, v in common.items()):
        continue
    seed, d, full = cell["seed"], cell["domains"], none[cell["seed"]]
    name = probe or (f"{cell['method']}@{cell['ratio']:g}" if cell["ratio"] is not None else cell["method"])
    key = (cell["method"], cell["ratio"], seed, cell.get("seconds"), *(d[k]["rate"] for k in ("illegal", "legal_near", "legal_far")))
    if key in seen:
        continue
    seen.add(key)
    g = cell.get("guard") or {}
    points.append({
        "name": name, "source": "probe" if probe else "grid", "method": cell["method"], "ratio": cell["ratio"],
        "seed": seed, "family": family(cell["method"]), "frozen_params": g.get("ratio_by_params", 0.0),
        "mitigation": 1 - d["illegal"]["rate"] / full["illegal"]["rate"],
        "legal_near": 1 - d["legal_near"]["rate"] / full["legal_near"]["rate"],
        "legal_far": 1 - d["legal_far"]["rate"] / full["legal_far"]["rate"],
        "settings": settings,
    })

inside = [p for p in points if p["mitigation"] >= 0.6 and p["legal_near"] <= 0.1 and p["legal_far"] <= 0.05]
colours = {"random / importance / component freezing": "#8a8a8a", "learned mask (released values)": "#3b6ea8",
           "component or random set + immunised values": "#e08a3c", "learned mask + immunised values": "#c0392b"}
fig, axes = plt.subplots(1, 2, figsize=(13, 5.8), sharey=True)
for ax, side, line in ((axes[0], "legal_far", 0.05), (axes[1], "legal_near", 0.10)):
    ax.add_patch(plt.Rectangle((-100, 60), 100 + 100 * line, 50, color="#2e8b57", alpha=0.12, lw=0))
    ax.axhline(60, color="#2e8b57", lw=0.8, ls="--")
    ax.axvline(100 * line, color="#2e8b57", lw=0.8, ls="--")
    for fam, colour in colours.items():
        for seed, marker in ((0, "o"), (1, "^")):
            pts = [p for p in points if p["family"] == fam and p["seed"] == seed]
            ax.scatter([100 * p[side] for p in pts], [100 * p["mitigation"] for p in pts], c=colour, marker=marker,
                       s=28, alpha=0.85, label=f"{fam}, seed {seed}" if side == "legal_far" else None,
                       edgecolors="white", linewidths=0.4)
    for p in points:  # names: the grid's immunised cells and whatever meets every goal (the rest: the JSON)
        if (p["source"] == "grid" and "immunise" in p["method"]) or p in inside:
            ax.annotate(f"{p['name']} (s{p['seed']})", (100 * p[side], 100 * p["mitigation"]), fontsize=6, alpha=0.85,
                        xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel(f"{side.replace('_', '-')} impact, % (goal <= {100 * line:.0f}%)")
    ax.set_xlim(-25, 100)
    ax.set_ylim(-10, 100)
    ax.grid(alpha=0.3)
axes[0].set_ylabel("mitigation (rate), % (goal >= 60%)")
axes[0].legend(fontsize=6.5, loc="lower right")
fig.suptitle("figures, relearn form, quick profile's users: every variant measured (goal box shaded)", fontsize=10)
fig.tight_layout()
prefix.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(prefix.with_suffix(".png"), dpi=130)
for p in points:
    p.pop("settings")
prefix.with_suffix(".json").write_text(json.dumps({"baseline": "runs/quick full fine-tuning of the same seed",
                                                   "points": points}, indent=1))
print(f"{len(points)} points; inside the goal: " + ", ".join(f"{p['name']} (seed {p['seed']})" for p in inside))
