"""Guard learning versus one user fine-tune of the attack budget, side by side on the embedded default.

Budgets (docs/benchmark.md): a whole guard learning costs <= 5x one user fine-tune of the attack budget, a whole
release (learning plus immunising) <= 10x. Both
run here in one process, one after the other, on the same model, the same scenario data and the same batch
size, and the script prints the ratio of their wall times (and of each stage of the learning: warm start,
mask learning). Absolute times on a shared machine are noise; the ratio is the figure.

    python benchmarks/learn_cost.py                         # figures, seed 0, LearnConfig defaults
    python benchmarks/learn_cost.py --mask-steps 120 --steps 400
    python benchmarks/learn_cost.py --method guard+freeze-kv+immunise   # the whole release: learning + immunising
    python benchmarks/learn_cost.py --method freeze-cross-attention+immunise --options '{"immunise": {"unroll_steps": 2}}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400, help="the user's attack budget")
    parser.add_argument("--mask-steps", type=int, default=None, help="LearnConfig.mask_steps (default: its default)")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--method", default="guard",
                        help="guard (learn_guard alone) or a registered method whose release is timed whole, "
                             "as the bench makes it (ratio by parameters), e.g. guard+kv+immunise")
    parser.add_argument("--options", default=None,
                        help="stage options as a profile's `options` (JSON, or a path to a JSON file), "
                             "e.g. '{\"immunise\": {\"unroll_steps\": 2}}'")
    parser.add_argument("--budget", type=float, default=None,
                        help="the ratio to hold (default: 5 for guard learning alone, 10 for a whole release)")
    args = parser.parse_args()
    options = _options(args.options)
    budget = args.budget if args.budget is not None else (5.0 if args.method == "guard" else 10.0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from freezeasguard import zoo
    from freezeasguard.bench import emoji
    from freezeasguard.configs import from_partial
    from freezeasguard.finetuning import FinetuneConfig, attacker_train_config, finetune
    from freezeasguard.learn import LearnConfig, learn_guard

    sc = emoji.scenario(args.scenario, args.seed)
    res = zoo.load_base().resolution
    ill = emoji.dataset(sc.items("illegal", "publisher"), res, preload=True)
    leg = emoji.dataset(sc.items("legal_near", "publisher") + sc.items("legal_far", "publisher"), res, preload=True)
    user = emoji.dataset(sc.items("illegal", "user"), res, preload=True)
    cfg = from_partial(LearnConfig, {**options.get("guard", {}), "ratio": args.ratio, "seed": args.seed})
    if args.mask_steps is not None:
        cfg = dataclasses.replace(cfg, mask_steps=args.mask_steps)
    train = dataclasses.replace(attacker_train_config(), max_steps=args.steps, progress=False, seed=args.seed)

    t0 = time.perf_counter()
    finetune(zoo.load_base(), user, config=FinetuneConfig(method="full", train=train))
    t_user = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.method == "guard":
            guard = learn_guard(zoo.load_base(), ill, leg, cfg, output_dir=tmp)
        else:
            from freezeasguard.protections import ReleaseContext, protect

            guard = protect(args.method, ReleaseContext(zoo.load_base(), ill, leg, args.ratio, seed=args.seed,
                                                        output_dir=tmp, ratio_by="params"),
                            {**options, "guard": cfg}).guard
        t_learn = time.perf_counter() - t0
    stages = guard.provenance.get("timing_seconds", {})
    report = {"method": args.method, "user_finetune_s": t_user, "release_s": t_learn, "ratio": t_learn / t_user,
              "stages_s": stages, "budget": budget, "within_budget": t_learn / t_user <= budget, "options": options,
              "config": {"steps": args.steps, "mask_steps": cfg.mask_steps, "mask_every": cfg.mask_every,
                         "warm_start_steps": cfg.warm_start.max_steps, "batch_size": train.batch_size}}
    print(json.dumps(report, indent=2))
    print(f"{args.method} release / one user fine-tune of {args.steps} steps: {t_learn / t_user:.2f}x (budget {budget:g}x)")


def _options(text: str | None) -> dict:
    """A profile's `options`: inline JSON, or the path of a JSON file (a whole profile's `options` is taken)."""
    if not text:
        return {}
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as fh:
            data = json.load(fh)
        data = data.get("options", data) if isinstance(data, dict) else data
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--options: neither a file nor JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise SystemExit(f"--options: expected an object of stage name -> settings, got {text!r}")
    return data


if __name__ == "__main__":
    main()
