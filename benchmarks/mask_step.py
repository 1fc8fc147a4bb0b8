"""Time a guard-learning mask step and a guard-learning user step against a plain fine-tuning step.

Same model, same batch size, one process, measurements interleaved (plain, user, mask, plain, ...), medians
reported with their ratios. Goal (docs/benchmark.md): a mask step <= 1.25x a plain fine-tuning step.

    python benchmarks/mask_step.py                      # the embedded default on the figures scenario
    python benchmarks/mask_step.py --model PATH --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="'embedded', 'tiny' (random) or a model directory")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from freezeasguard.learn import LearnConfig, MaskLearner, MixedData
    from freezeasguard.model import DiffusionModel
    from freezeasguard.objective import DenoisingObjective, EncodedDataset
    from freezeasguard.training import TrainConfig, TrainContext
    from freezeasguard.training.core import make_accelerator

    torch.set_num_threads(args.threads)
    if args.model == "embedded":
        from freezeasguard import emoji, zoo

        model = zoo.load_base()
        sc = emoji.scenario("figures")
        ill = emoji.dataset(sc.items("illegal", "publisher"), model.resolution, preload=True)
        leg = emoji.dataset(sc.items("legal_near", "publisher"), model.resolution, preload=True)
    else:
        import numpy as np
        from PIL import Image

        from freezeasguard.data import ImageCaptionList, ImageTransform
        from freezeasguard.tiny import TinySpec, build_tiny_model

        model = build_tiny_model(TinySpec()) if args.model == "tiny" else DiffusionModel.from_pretrained(args.model)
        rng = np.random.default_rng(0)
        side = model.resolution
        imgs = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(16)]
        ill = ImageCaptionList(imgs, ["a red cat"] * 16, ImageTransform(side))
        leg = ImageCaptionList(imgs, ["a blue dog"] * 16, ImageTransform(side))
    with torch.no_grad():
        ill, leg = EncodedDataset(model, ill), EncodedDataset(model, leg)
    objective = DenoisingObjective(model)
    params = {f"unet.{n}": p for n, p in model.unet.named_parameters()}
    for p_ in objective.parameters():
        p_.requires_grad_(False)
    for p_ in params.values():
        p_.requires_grad_(True)
    mixed = MixedData(ill, leg)
    cfg = LearnConfig(mask_batch=args.batch_size, mask_every=2)
    d = torch.cat([p_.detach().reshape(-1) for p_ in params.values()]) * 1e-3
    learner = MaskLearner(params, ill, leg, cfg, initial_d=d)
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-5)
    acc = make_accelerator()
    ctx = TrainContext(acc, objective, objective, optimizer, params, TrainConfig(batch_size=args.batch_size))
    learner.on_train_start(ctx)

    def batch(step: int):
        examples = [dict(mixed.example((step * args.batch_size + i) % len(mixed), 1000 * step + i), seeds=1000 * step + i)
                    for i in range(args.batch_size)]
        return mixed.collate(examples)

    def plain(step: int) -> float:
        b = batch(step)
        t0 = time.perf_counter()
        loss = objective(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def user(step: int) -> float:
        b = batch(step)
        t0 = time.perf_counter()
        loss = objective(b)
        loss.backward()
        learner.on_before_optimizer_step(ctx)
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.step = 1  # odd, so on_step_end only swaps back; the mask step is timed on its own
        learner.on_step_end(ctx)
        return time.perf_counter() - t0

    def mask(step: int) -> float:
        t0 = time.perf_counter()
        learner.mask_step(ctx)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"plain fine-tuning step": [], "guard-learning user step": [], "mask step": []}
    for step in range(args.repeats + 2):
        for name, fn in zip(times, (plain, user, mask)):
            t = fn(step)
            if step >= 2:  # warm-up
                times[name].append(t)
    base = statistics.median(times["plain fine-tuning step"])
    n_params = sum(p_.numel() for p_ in params.values())
    print(f"model: {args.model}; UNet {len(params)} tensors, {n_params:,} parameters; batch {args.batch_size}; "
          f"{args.repeats} interleaved repeats, medians")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<26} {med * 1000:8.1f} ms   {med / base:5.2f}x plain")


if __name__ == "__main__":
    main()
