"""`freezeasguard demo`: the paper's story on the embedded default, in minutes on a CPU.

The base is taught the protected figures, the publisher unlearns them (UCE) and releases the unlearned model
with a learned guard; an illegal user tries to relearn the figures from their own images and a legal user adapts
the model to new domains, each with and without the guard. The demo is one run of the benchmark's own cells
(`bench.run_bench` with a two-cell profile: full fine-tuning and the guard, both with learning curves), so the
two cannot drift apart; on top it writes report/ (report.md, metrics.json, sample grids, the mask per block, the
learning curves). Every cell is cached in the output directory, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..configs import RATIO_BY_DEFAULT
from ..learn import LearnConfig
from ..utils.files import atomic_write_json, atomic_write_text
from .battery import recorded_battery, recorded_lines
from .evaluate import SamplingConfig
from .profiles import STRONGEST_RELEASE, BenchProfile, cell_key
from .relearn import RelearnConfig
from .report import SAMPLE_DOMAINS, plot_curves, sample_grid
from .runner import run_bench


@dataclass
class DemoConfig:
    scenario: str = "figures"  # relearn form; "figures-scratch" for the from-scratch variant
    ratio: float = 0.3
    ratio_by: str = RATIO_BY_DEFAULT  # the guard's ratio counts parameters (a budget), as everywhere
    seed: int = 0
    steps: int = 400  # the illegal user's attack budget
    legal_steps: int = 400  # the legal user's budget (the bench's quick profile runs legal users to their plateau)
    batch_size: int = 32
    lr: float = 1e-4
    n_samples: int = 100
    curve_steps: list[int] = field(default_factory=lambda: [50, 100, 200, 400])
    learn: LearnConfig = field(default_factory=LearnConfig)
    relearn: RelearnConfig = field(default_factory=RelearnConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grid_columns: int = 8
    # A release measured beside the guard (no learning curve): the project's strongest, since the guard alone
    # shows what does not protect (measured: the demo with it 910 s on 2 cores, about 220 s of it the release's).
    # None: only the guard is measured; the strongest release's figures are then quoted from the shipped record.
    release: str | None = STRONGEST_RELEASE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def profile(self) -> BenchProfile:
        """The bench profile this demo runs: full fine-tuning and the guard at the demo's ratio, with curves."""
        methods = ["none", "guard"] + ([self.release] if self.release else [])
        return BenchProfile("demo", [self.scenario], methods, [self.ratio], [self.seed], steps=self.steps,
                            legal_steps=self.legal_steps, batch_size=self.batch_size, lr=self.lr,
                            n_samples=self.n_samples, curve_cells=["none", f"guard@{self.ratio:g}"],
                            curve_steps=list(self.curve_steps), legal_curve_steps=[], curve_samples=self.n_samples,
                            sampling=self.sampling, relearn=self.relearn, ratio_by=self.ratio_by,
                            options={"guard": self.learn}, skip_void=False)  # the demo shows the guarded user even where a check fails


def run_demo(out: str | Path, config: DemoConfig | None = None, *, model_loader: Any = None,
             recogniser: Any = None, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) the demo into `out`; returns the metrics written to out/report/metrics.json."""
    from ..guard import Guard
    from ..utils.plots import plot_guard

    cfg = config or DemoConfig()
    out = Path(out)
    t0 = time.perf_counter()
    profile = cfg.profile()
    summary = run_bench(out, profile, model_loader=model_loader, recogniser=recogniser, command="freezeasguard demo",
                        overwrite=overwrite, claim_as="demo", extra_products=("report",))
    cells = json.loads((out / "results.json").read_text())["cells"]
    report = out / "report"
    report.mkdir(exist_ok=True)
    key = lambda m, r=None: cell_key(cfg.scenario, cfg.seed, m, r)  # noqa: E731
    base, full, guarded = cells[key("base")], cells[key("none")], cells[key("guard", cfg.ratio)]
    guard = Guard.load(out / "work" / key("guard", cfg.ratio) / "guard.json")
    plot_guard(guard, report / "mask.png")
    shutil.copy(out / "work" / key("guard", cfg.ratio) / "guard.json", report / "guard.json")
    plot_curves(summary, report / "curves.png")
    # The derived figures and the verdict are the bench summary's own row: one implementation of both.
    row = next((r for r in summary["table"] if r["method"] == "guard"), None)
    validity = summary["validity"][0] if summary["validity"] else {"checks": [], "valid": False}
    result = {
        "scenario": cfg.scenario, "seed": cfg.seed, "config": json.loads(json.dumps(cfg.to_dict())),
        "guard": guard.summary(), "derived": _derived(row), "verdict": (row or {}).get("verdict"),
        "validity": validity["checks"], "valid": validity["valid"],
        "models": {"base": base["models"], "full": full["domains"], "guarded": guarded["domains"]},
        "curves": {"full": full["curves"], "guarded": guarded["curves"]},
        "seconds": {"this_run": time.perf_counter() - t0,
                    **{f"{k}:{u}": s for k, c in (("full", full), ("guarded", guarded))
                       for u, s in c.get("finetune_seconds", {}).items()},
                    "guard_release": guarded.get("release_seconds")},
        "grids": _grids(out, cfg, key),
    }
    if cfg.release:
        cell = cells[key(cfg.release)]
        release_row = next((r for r in summary["table"] if r["method"] == cfg.release), None)
        result["release"] = {"method": cfg.release, "derived": _derived(release_row),
                             "verdict": (release_row or {}).get("verdict"), "domains": cell["domains"]}
        result["seconds"].update({f"release:{u}": s for u, s in cell.get("finetune_seconds", {}).items()})
        result["seconds"]["release"] = cell.get("release_seconds")
    result["recorded_battery"] = recorded_battery()
    atomic_write_json(report / "metrics.json", result)
    atomic_write_text(report / "report.md", _markdown(result, cfg))
    return result


def _derived(row: dict[str, Any] | None) -> dict[str, float | None]:
    """The summary row's mitigation and legal impacts (None where the setting was void: no row)."""
    keys = [f"{k}{suffix}" for suffix in ("", "_prob") for k in ("mitigation", "legal_impact_near", "legal_impact_far")]
    return {k: (row or {}).get(k) for k in keys}


def _grids(out: Path, cfg: DemoConfig, key: Any) -> dict[str, Any]:
    """Sample grids per domain, a row per model (full, guarded fine-tune): the first images each bench cell
    kept of its evaluation at the user's budget."""
    models = {"full": key("none"), "guarded": key("guard", cfg.ratio)}
    grids = {}
    for domain in SAMPLE_DOMAINS:
        files = {label: out / "work" / cell / f"samples-{domain}.safetensors" for label, cell in models.items()}
        name = f"grid-{domain}.png"
        if sample_grid([(f"{label} fine-tune", f) for label, f in files.items()], out / "report" / name,
                       columns=cfg.grid_columns):
            grids[domain] = {"file": name, "rows": [label for label, f in files.items() if f.is_file()]}
    return grids


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    groups = [(f"base: {which}", doms) for which, doms in result["models"]["base"].items()]
    groups += [("full fine-tune", result["models"]["full"]), ("guarded fine-tune", result["models"]["guarded"])]
    if "release" in result:
        groups.append((f"{result['release']['method']} fine-tune", result["release"]["domains"]))
    for model, doms in groups:
        for domain, m in doms.items():
            lo, hi = m["rate_ci95"]
            fid = "n/a" if m.get("fid") is None else f"{m['fid']:.2f}"
            rows.append((model, domain, f"{_pct(m['rate'])} [{_pct(lo)}, {_pct(hi)}]", _pct(m["mean_prob"]), fid))
    return rows


def _markdown(result: dict[str, Any], cfg: DemoConfig) -> str:
    g, d = result["guard"], result["derived"]
    lines = [
        f"# freezeasguard demo: scenario `{result['scenario']}`, seed {result['seed']}", "",
        "Command: `freezeasguard demo`. Everything below was measured by that run (config in metrics.json; the "
        "bench report of the same cells is ../results.md).", "",
        "The base was taught the protected figures from the publisher's images, then unlearned (UCE): that "
        "release is what users fine-tune. The illegal user tries to relearn the figures from their own images "
        f"({cfg.steps} AdamW steps, batch {cfg.batch_size}, lr {cfg.lr}); the legal user adapts the release to "
        f"new people and hand gestures ({cfg.legal_steps} steps). "
        f"Guard: {g['frozen_tensors']}/{g['total_tensors']} UNet tensors frozen ({_pct(g['ratio_by_count'])} of the "
        f"tensors, {_pct(g['ratio_by_params'])} of the parameters), learned from the publisher's samples; per block: "
        f"`mask.png`. Sampling: DDIM {cfg.sampling.num_inference_steps} steps, guidance "
        f"{cfg.sampling.guidance_scale}, {cfg.n_samples} samples per model and domain.", "",
        "## Result", "",
        f"- mitigation (1 - guarded/full on the illegal domain): **{_pct(d['mitigation'])}** by recognition rate, "
        f"{_pct(d['mitigation_prob'])} by mean probability",
        f"- legal impact, legal-near: **{_pct(d['legal_impact_near'])}** (prob {_pct(d['legal_impact_near_prob'])}); "
        f"legal-far: **{_pct(d['legal_impact_far'])}** (prob {_pct(d['legal_impact_far_prob'])})",
        f"- benchmark valid: **{'yes' if result['valid'] else 'NO (see the checks; no derived figure is reported)'}**",
        "- goals: " + ("n/a" if not result.get("verdict") else "met" if result["verdict"]["met"]
                       else "not met (" + "; ".join(result["verdict"]["reasons"]) + ")"),
        *_release_lines(result, cfg),
        "", "| model | domain | recognition [95% CI] | mean prob. | FD (recogniser features) |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {e} | {f} |" for a, b, c, e, f in table_rows(result)]
    lines += ["", "## Learning curves (illegal user)", "", "| steps | full | guarded |", "|---|---|---|"]
    full = {p["step"]: p["rate"] for p in result["curves"]["full"].get("illegal", [])}
    guarded = {p["step"]: p["rate"] for p in result["curves"]["guarded"].get("illegal", [])}
    lines += [f"| {s} | {_pct(full.get(s))} | {_pct(guarded.get(s))} |" for s in sorted(set(full) | set(guarded))]
    lines += ["", "![curves](curves.png)", "", "## Validity checks", "", "| check | value | needs | ok |",
              "|---|---|---|---|"]
    lines += [f"| {c['check']} | {_pct(c['value'])} | {c['threshold']} | {'yes' if c['ok'] else 'NO'} |"
              for c in result["validity"]]
    lines += ["", "## Sample grids", "", "Rows: each model; columns: the first prompts of the domain.", ""]
    lines += [f"- `{info['file']}` ({dom}): rows {', '.join(info['rows'])}" for dom, info in result["grids"].items()]
    lines += ["", "## Time (seconds, this machine)", ""]
    lines += [f"- {k}: {v:.0f}" for k, v in result["seconds"].items() if v is not None]
    return "\n".join(lines) + "\n"


def _release_lines(result: dict[str, Any], cfg: DemoConfig) -> list[str]:
    """What protects: the release measured beside the guard (if any), and the battery's recorded worst cases of
    the guard and the strongest release, labelled as recorded."""
    lines = ["", "## What protects", ""]
    if "release" in result:
        d = result["release"]["derived"]
        lines += [f"Measured by this run, against the same default attacker: `{result['release']['method']}` mitigates "
                  f"**{_pct(d['mitigation'])}** at a legal impact of {_pct(d['legal_impact_near'])} (near) and "
                  f"{_pct(d['legal_impact_far'])} (far); the guard above {_pct(result['derived']['mitigation'])}.", ""]
    else:
        lines += [f"This run measured the paper's guard only (`--no-release`); without that option the demo also "
                  f"measures the project's strongest release (`{STRONGEST_RELEASE}`) beside it.", ""]
    return lines + (recorded_lines(result["recorded_battery"], _quoted(cfg))
                    or ["No battery figure is recorded for these protections.", ""])


def _quoted(cfg: DemoConfig) -> list[tuple[str, float | None]]:
    """The protections whose recorded battery figures the demo quotes: its guard, the strongest release, and
    the release it measured."""
    return [("guard", cfg.ratio), (STRONGEST_RELEASE, None)] + ([(cfg.release, None)] if cfg.release else [])


def summary_lines(result: dict[str, Any], cfg: DemoConfig) -> list[str]:
    """What `freezeasguard demo` prints under its table: the guard's derived figures, the release's if it was
    measured, and the battery's recorded worst cases (labelled as recorded)."""
    d = result["derived"]
    lines = [f"guard: mitigation {_pct(d['mitigation'])} (prob {_pct(d['mitigation_prob'])}); legal impact near "
             f"{_pct(d['legal_impact_near'])}, far {_pct(d['legal_impact_far'])}; benchmark valid: "
             f"{'yes' if result['valid'] else 'NO'}"]
    if "release" in result:
        r = result["release"]["derived"]
        lines.append(f"{result['release']['method']}: mitigation {_pct(r['mitigation'])}; legal impact near "
                     f"{_pct(r['legal_impact_near'])}, far {_pct(r['legal_impact_far'])}")
    return lines + [line for line in recorded_lines(result["recorded_battery"], _quoted(cfg)) if line]
