"""Full versus guarded fine-tuning, side by side on the same model, data and batch.

Each configuration runs in its own process (so one run's freed memory cannot hide another's peak), the
configurations alternate, and the script prints ratios against full fine-tuning measured in this one run:
trainable parameters, optimizer state, peak memory (whole process, and above the pre-training baseline) and
median step time.

    python benchmarks/finetune_savings.py                       # small random model, guard at 0.5, CPU
    python benchmarks/finetune_savings.py --model PATH --ratio 0.3 --batch-size 4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {
    # block_out_channels, cross-attention per level, text width, resolution
    "tiny": dict(block_out_channels=(16, 32), cross_attention=(False, True), text_hidden_size=32, resolution=16),
    "small": dict(block_out_channels=(64, 128, 128), cross_attention=(False, True, True), text_hidden_size=128,
                  resolution=32, norm_num_groups=32, layers_per_block=2),
}


def worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    from PIL import Image

    from freezeasguard.data import ImageCaptionList, ImageTransform
    from freezeasguard.finetuning import FinetuneConfig, finetune
    from freezeasguard.guard import Guard
    from freezeasguard.model import DiffusionModel
    from freezeasguard.tiny import TinySpec, build_tiny_model
    from freezeasguard.training import TrainConfig

    torch.set_num_threads(args.threads)
    if args.model:
        model = DiffusionModel.from_pretrained(args.model)
    else:
        model = build_tiny_model(TinySpec(**SIZES[args.size]), seed=0)
    if args.device != "cpu":
        model.to(args.device)
    side = model.resolution
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(32)]
    data = ImageCaptionList(images, ["a red cat", "a blue dog"] * 16, ImageTransform(side))
    guard = None
    if args.run != "full":
        guard = Guard.load(args.guard) if args.guard else Guard.random(model.unet, args.ratio, seed=0)
    method = "lora" if args.run == "guarded-lora" else "full"
    cfg = FinetuneConfig(method=method, train=TrainConfig(max_steps=args.steps, batch_size=args.batch_size,
                                                          learning_rate=1e-5, progress=False,
                                                          mixed_precision=args.mixed_precision))
    result = finetune(model, data, guard=guard, config=cfg)
    m = result.train.metrics
    out = {
        "run": args.run,
        "trainable_parameters": result.trainable_parameters,
        "unet_parameters": result.unet.parameters,
        "optimizer_state_bytes": m["optimizer_state_bytes"],
        "peak_memory_bytes": m["peak_memory_bytes"],
        "peak_above_start_bytes": m["peak_memory_bytes"] - (m["rss_before_train_bytes"] or 0)
        if m["peak_memory_kind"] != "cuda_max_allocated" else m["peak_memory_bytes"],
        "peak_memory_kind": m["peak_memory_kind"],
        "step_time_median_s": m["step_time_s"]["median"],
        "frozen_ratio_by_count": guard.ratio_by_count if guard else 0.0,
        "frozen_ratio_by_params": guard.ratio_by_params if guard else 0.0,
        "device": m["device"],
    }
    Path(args.result).write_text(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: a random model of --size)")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--guard", help="guard file (default: a random guard at --ratio)")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--runs", default="full,guarded,guarded-lora", help="comma list of full, guarded, guarded-lora")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        worker(args)
        return

    runs = args.runs.split(",")
    results: dict[str, list[dict]] = {r: [] for r in runs}
    passthrough = ["--size", args.size, "--ratio", str(args.ratio), "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--threads", str(args.threads), "--device", args.device,
                   "--mixed-precision", args.mixed_precision]
    if args.model:
        passthrough += ["--model", args.model]
    if args.guard:
        passthrough += ["--guard", args.guard]
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for run in runs:  # alternate, so drift on a shared machine hits every configuration alike
                out = Path(tmp) / f"{run}-{rep}.json"
                subprocess.run([sys.executable, __file__, "--run", run, "--result", str(out), *passthrough], check=True)
                results[run].append(json.loads(out.read_text()))

    def med(run: str, key: str) -> float:
        return statistics.median(r[key] for r in results[run])

    first = results[runs[0]][0]
    print(f"model: {args.model or args.size + ' (random init)'}; UNet parameters {first['unet_parameters']:,}; "
          f"batch {args.batch_size}; {args.steps} steps x {args.repeats} repeats per configuration; device {first['device']}; "
          f"memory = {first['peak_memory_kind']}")
    if "guarded" in results:
        g = results["guarded"][0]
        print(f"guard: {g['frozen_ratio_by_count']:.1%} of tensors, {g['frozen_ratio_by_params']:.1%} of parameters frozen")
    keys = [("trainable_parameters", "trainable params"), ("optimizer_state_bytes", "optimizer state"),
            ("peak_memory_bytes", "peak memory"), ("peak_above_start_bytes", "peak above start"),
            ("step_time_median_s", "median step time")]
    header = f"{'configuration':<14}" + "".join(f"{label:>20}" for _, label in keys)
    print(header)
    table = {}
    for run in runs:
        row = {k: med(run, k) for k, _ in keys}
        table[run] = row
        cells = []
        for k, _ in keys:
            ratio = row[k] / table[runs[0]][k] if table[runs[0]][k] else float("nan")
            value = f"{row[k] / 2**20:.1f}MiB" if "bytes" in k else (f"{row[k] * 1000:.0f}ms" if "time" in k else f"{row[k]:,.0f}")
            cells.append(f"{value} ({ratio:.2f}x)")
        print(f"{run:<14}" + "".join(f"{c:>20}" for c in cells))
    print(f"ratios are against '{runs[0]}' in this run; medians over repeats")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "median": table, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
