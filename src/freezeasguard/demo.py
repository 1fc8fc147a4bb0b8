"""`freezeasguard demo`: the whole story on the embedded default, in minutes on a CPU.

Learn a guard for a scenario from the publisher's samples; fine-tune the base as an illegal user and as a
legal user, each with and without the guard; sample and score every model on every domain; write report/
(report.md, metrics.json, sample grids, the mask per block) and print a short table. Every stage is cached in
the output directory, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .evaluate import SamplingConfig, base_families_domain, evaluate, scenario_domains, validity_checks
from .images import save_grid
from .io import atomic_write_json, atomic_write_text
from .learn import LearnConfig, learn_guard
from .training import TrainConfig

@dataclass
class DemoConfig:
    scenario: str = "figures"
    ratio: float = 0.3
    seed: int = 0
    learn: LearnConfig = field(default_factory=LearnConfig)
    finetune_steps: int = 400
    finetune_batch: int = 32
    finetune_lr: float = 1e-4
    n_samples: int = 200
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grid_columns: int = 8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_demo(out: str | Path, config: DemoConfig | None = None, *, model_loader: Any = None,
             recogniser: Any = None) -> dict[str, Any]:
    """Run (or resume) the demo into `out`; returns the metrics written to out/report/metrics.json."""
    from . import emoji, zoo
    from .finetuning import FinetuneConfig, finetune
    from .model import DiffusionModel
    from .plots import plot_guard

    cfg = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report"
    report.mkdir(exist_ok=True)
    t_start = time.perf_counter()
    load = model_loader or zoo.load_base
    rec = recogniser or zoo.load_recogniser()
    sc = emoji.scenario(cfg.scenario, cfg.seed)
    base = load()
    res = base.resolution
    state_path = out / "state.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("config") not in (None, json.loads(json.dumps(cfg.to_dict()))):
        raise ValueError(f"{out}: holds a demo run with another configuration; use a new directory")
    state["config"] = json.loads(json.dumps(cfg.to_dict()))
    state.setdefault("timing_seconds", {})
    state.setdefault("metrics", {})

    def save_state() -> None:
        atomic_write_json(state_path, state)

    # 1. learn the guard from the publisher's samples
    guard_path = out / "guard" / "guard.json"
    if not guard_path.exists():
        t0 = time.perf_counter()
        ill = emoji.dataset(sc.items("illegal", "publisher"), res, preload=True)
        leg = emoji.dataset(sc.items("legal_near", "publisher") + sc.items("legal_far", "publisher"), res, preload=True)
        learn_cfg = replace(cfg.learn, ratio=cfg.ratio, seed=cfg.seed)
        learn_guard(load(), ill, leg, learn_cfg, output_dir=out / "guard",
                    provenance={"scenario": sc.manifest(), "model": "embedded"})
        state["timing_seconds"]["learn_guard"] = time.perf_counter() - t0
        save_state()
    from .guard import Guard

    guard = Guard.load(guard_path)
    plot_guard(guard, report / "mask.png")

    # 2. users fine-tune, with and without the guard
    users = {
        "illegal": sc.items("illegal", "user"),
        "legal": sc.items("legal_near", "user") + sc.items("legal_far", "user"),
    }
    models: dict[str, Any] = {"base": base}
    for user, items in users.items():
        for guarded in (False, True):
            key = f"{user}-{'guarded' if guarded else 'full'}"
            run_dir = out / f"finetune-{key}"
            if not (run_dir / "finetune.json").exists():
                t0 = time.perf_counter()
                data = emoji.dataset(items, res, preload=True)
                ft_cfg = FinetuneConfig(method="full", train=TrainConfig(
                    max_steps=cfg.finetune_steps, batch_size=cfg.finetune_batch, learning_rate=cfg.finetune_lr,
                    seed=cfg.seed, checkpoint_every=100))
                finetune(load(), data, guard=guard if guarded else None, config=ft_cfg, output_dir=run_dir)
                state["timing_seconds"][f"finetune-{key}"] = time.perf_counter() - t0
                save_state()
            models[key] = DiffusionModel.from_pretrained(run_dir / "model", torch_dtype=torch.float32)

    # 3. evaluate every model on the domains it is about
    domains = scenario_domains(sc, res)
    domains["base_families"] = base_families_domain(res)
    plan = [("base", d) for d in domains] + [
        ("illegal-full", "illegal"), ("illegal-guarded", "illegal"),
        ("legal-full", "legal_near"), ("legal-guarded", "legal_near"),
        ("legal-full", "legal_far"), ("legal-guarded", "legal_far"),
    ]
    grids: dict[str, dict[str, torch.Tensor]] = {}
    t0 = time.perf_counter()
    for model_key, domain_key in plan:
        cell = f"{model_key}/{domain_key}"
        images_path = out / "samples" / f"{model_key}--{domain_key}.pt"
        if cell in state["metrics"] and images_path.exists():
            from safetensors.torch import load_file

            images = load_file(str(images_path))["images"]
        else:
            metrics, images = evaluate(models[model_key], domains[domain_key], rec, n_samples=cfg.n_samples,
                                       seed=cfg.seed, sampling=cfg.sampling)
            from safetensors.torch import save_file

            images_path.parent.mkdir(exist_ok=True)
            save_file({"images": images[: cfg.grid_columns].contiguous()}, str(images_path))
            state["metrics"][cell] = metrics
            save_state()
        grids.setdefault(domain_key, {})[model_key] = images[: cfg.grid_columns]
    if "evaluate" not in state["timing_seconds"]:
        state["timing_seconds"]["evaluate"] = time.perf_counter() - t0

    # 4. report
    result = _summarise(state, guard, sc)
    for domain_key, rows in grids.items():
        real = domains[domain_key].real[: cfg.grid_columns]
        order = ["base"] + [k for k in ("illegal-full", "illegal-guarded", "legal-full", "legal-guarded") if k in rows]
        stacked = torch.cat([real] + [rows[k] for k in order])
        save_grid(stacked, report / f"grid-{domain_key}.png", nrow=len(real), scale=3)
        result["grids"][domain_key] = {"file": f"grid-{domain_key}.png", "rows": ["real"] + order}
    state["timing_seconds"]["total_this_run"] = time.perf_counter() - t_start
    result["timing_seconds"] = state["timing_seconds"]
    save_state()
    atomic_write_json(report / "metrics.json", result)
    atomic_write_text(report / "report.md", _markdown(result, cfg))
    shutil.copy(out / "guard" / "guard.json", report / "guard.json")
    return result


def _rate(state: dict[str, Any], cell: str) -> float | None:
    m = state["metrics"].get(cell)
    return None if m is None else m["rate"]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return 1 - a / b


def _summarise(state: dict[str, Any], guard: Any, sc: Any) -> dict[str, Any]:
    r = lambda cell: _rate(state, cell)  # noqa: E731
    derived = {
        "mitigation": _ratio(r("illegal-guarded/illegal"), r("illegal-full/illegal")),
        "legal_impact_near": _ratio(r("legal-guarded/legal_near"), r("legal-full/legal_near")),
        "legal_impact_far": _ratio(r("legal-guarded/legal_far"), r("legal-full/legal_far")),
    }
    checks = validity_checks({d: r(f"base/{d}") for d in ("base_families", "illegal", "legal_near", "legal_far")},
                             r("illegal-full/illegal"))
    return {
        "scenario": sc.name,
        "seed": sc.seed,
        "guard": guard.summary(),
        "metrics": state["metrics"],
        "derived": derived,
        "validity": checks,
        "valid": all(c["ok"] for c in checks),
        "grids": {},
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for cell, m in sorted(result["metrics"].items()):
        model, domain = cell.split("/")
        lo, hi = m["rate_ci95"]
        fid = "n/a" if m["fid"] is None else f"{m['fid']:.2f}"
        rows.append((model, domain, f"{_pct(m['rate'])} [{_pct(lo)}, {_pct(hi)}]", _pct(m["mean_prob"]), fid))
    return rows


def _markdown(result: dict[str, Any], cfg: DemoConfig) -> str:
    g = result["guard"]
    d = result["derived"]
    lines = [
        f"# freezeasguard demo: scenario `{result['scenario']}`, seed {result['seed']}",
        "",
        "Command: `freezeasguard demo`. Everything below was measured by that run (config in metrics.json).",
        "",
        f"Guard: {g['frozen_tensors']}/{g['total_tensors']} UNet tensors frozen ({_pct(g['ratio_by_count'])} by count, "
        f"{_pct(g['ratio_by_params'])} of parameters), learned from the publisher's samples. Per block: `mask.png`.",
        f"Fine-tuning: {cfg.finetune_steps} AdamW steps, batch {cfg.finetune_batch}, lr {cfg.finetune_lr}, on the "
        f"user's samples (disjoint from the publisher's). Sampling: DDIM {cfg.sampling.num_inference_steps} steps, "
        f"guidance {cfg.sampling.guidance_scale}, {cfg.n_samples} samples per cell.",
        "",
        "## Result",
        "",
        f"- mitigation (1 - guarded/full recognition on the illegal domain): **{_pct(d['mitigation'])}**",
        f"- legal impact, legal-near: **{_pct(d['legal_impact_near'])}**; legal-far: **{_pct(d['legal_impact_far'])}**",
        f"- benchmark valid: **{'yes' if result['valid'] else 'NO (see the checks; the numbers above are void)'}**",
        "",
        "| model | domain | recognition [95% CI] | mean prob. | FD (recogniser features) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {e} | {f} |" for a, b, c, e, f in table_rows(result)]
    lines += ["", "## Validity checks", "", "| check | value | needs | ok |", "|---|---|---|---|"]
    lines += [f"| {c['check']} | {_pct(c['value'])} | {c['threshold']} | {'yes' if c['ok'] else 'NO'} |"
              for c in result["validity"]]
    lines += ["", "## Sample grids", "", "Rows: real images of the domain, then each model; columns: the first prompts.", ""]
    for domain, info in result["grids"].items():
        lines.append(f"- `{info['file']}` ({domain}): rows {', '.join(info['rows'])}")
    t = result.get("timing_seconds", {})
    lines += ["", "## Time (seconds, this machine)", ""] + [f"- {k}: {v:.0f}" for k, v in t.items()]
    return "\n".join(lines) + "\n"
