"""Time a guard-learning mask step and a guard-learning user step against a plain fine-tuning step, and
measure the bytes each step allocates, with the mask step's former implementation (which kept d and the
gradients in separate full-size buffers) and today's side by side.

Same model, same batch size, one process, measurements interleaved (plain, user, mask, plain, ...), medians
reported with their ratios. Goal (docs/benchmark.md): a mask step <= 1.25x a plain fine-tuning step.

Memory: the peak of the bytes allocated by torch operators during one step (freezeasguard.training.allocations: exact
on CPU and GPU; the parameters, d and the optimizer state that exist before the step are not counted). "before"
runs the learner with the former implementation patched in (gradients concatenated into one flat copy,
multiplied by d into a second, and theta(m) updated through a temporary of d times the mask); "after" is the
library as it is: per-tensor dot products and in-place updates.

    python benchmarks/mask_step.py                      # the embedded default on the figures scenario
    python benchmarks/mask_step.py --model tiny --repeats 3
    python benchmarks/mask_step.py --model PATH --batch-size 16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Iterator


@contextlib.contextmanager
def former_mask_step(learner) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Patch the learner's module with the mask step's former implementation (kept here to measure it)."""
    import torch

    from freezeasguard import learn

    def mask_logit_gradient(grads, d_views, m, temperature):  # type: ignore[no-untyped-def]
        g_flat = torch.cat([g.reshape(-1) for g in grads]).to(learner.d.dtype)
        dots = torch.segment_reduce(g_flat * learner.d, "sum", lengths=learner.sizes.to(learner.d.device))
        return (dots * m * (1 - m) / temperature).to(m.dtype)

    def add_scaled_(targets, sources, scales):  # type: ignore[no-untyped-def]
        torch._foreach_add_(targets, torch._foreach_mul(sources, scales))

    saved = learn.mask_logit_gradient, learn.add_scaled_
    learn.mask_logit_gradient, learn.add_scaled_ = mask_logit_gradient, add_scaled_
    try:
        yield
    finally:
        learn.mask_logit_gradient, learn.add_scaled_ = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="'embedded', 'tiny' (random) or a model directory")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-former", action="store_true",
                   help="skip the former implementation (it needs two more UNet-sized buffers: at SD 1.5 size on a "
                        "24 GB machine it does not fit)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="the user's optimizer in both steps (sgd: no optimizer state, for models that fill memory)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (timings then wait for the GPU to finish each step)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from freezeasguard.learn import LearnConfig, MaskLearner, MixedData
    from freezeasguard.model import DiffusionModel
    from freezeasguard.objective import DenoisingObjective, EncodedDataset
    from freezeasguard.training import TrainConfig, TrainContext
    from freezeasguard.training.allocations import AllocationPeak
    from freezeasguard.training.core import make_accelerator

    torch.set_num_threads(args.threads)
    if args.model == "embedded":
        from freezeasguard import zoo
        from freezeasguard.bench import emoji

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
    model.to(args.device)
    with torch.no_grad():
        ill, leg = EncodedDataset(model, ill), EncodedDataset(model, leg)
    objective = DenoisingObjective(model)

    def now() -> float:  # a GPU runs asynchronously: a step's time is known once it has finished
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    params = {f"unet.{n}": p for n, p in model.unet.named_parameters()}
    for p_ in objective.parameters():
        p_.requires_grad_(False)
    for p_ in params.values():
        p_.requires_grad_(True)
    mixed = MixedData(ill, leg)
    cfg = LearnConfig(mask_batch=args.batch_size, mask_every=2)
    d = torch.cat([p_.detach().reshape(-1) for p_ in params.values()]) * 1e-3
    learner = MaskLearner(params, ill, leg, cfg, initial_d=d)
    optimizer = (torch.optim.AdamW(list(params.values()), lr=1e-5) if args.optimizer == "adamw"
                 else torch.optim.SGD(list(params.values()), lr=1e-5))
    acc = make_accelerator()
    ctx = TrainContext(acc, objective, objective, optimizer, params, TrainConfig(batch_size=args.batch_size))
    learner.on_train_start(ctx)

    def batch(step: int):
        pairs = args.batch_size // 2  # half illegal, half legal, as the learner's user batches
        return mixed.collate([mixed.example((step * pairs + i) % len(mixed), 1000 * step + i) for i in range(pairs)])

    # Memory pass: after each backward, the live bytes (the gradients) are noted and the peak restarts, so
    # "after backward" is what the step allocates beyond its gradients once the activations are freed.
    tracker: list = []  # the active AllocationPeak, the peak up to the end of the backward, the bytes live then

    def backward(loss) -> None:  # type: ignore[no-untyped-def]
        loss.backward()
        if tracker:
            tracker[1] = tracker[0].peak
            tracker[2] = tracker[0].reset_peak()

    acc.backward = backward  # what the mask step calls (no gradient scaler here)

    def plain(step: int) -> float:
        b = batch(step)
        t0 = now()
        loss = objective(b)
        backward(loss)
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return now() - t0

    def user(step: int) -> float:
        b = batch(step)
        t0 = now()
        loss = objective(b)
        backward(loss)
        learner.on_before_optimizer_step(ctx)
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.step = 1  # odd, so on_step_end only swaps back; the mask step is timed on its own
        learner.on_step_end(ctx)
        return now() - t0

    def mask(step: int) -> float:
        t0 = now()
        learner.mask_step(ctx)
        return now() - t0

    def mask_before(step: int) -> float:
        with former_mask_step(learner):
            return mask(step)

    def user_before(step: int) -> float:
        with former_mask_step(learner):
            return user(step)

    steps = {"plain fine-tuning step": plain, "guard-learning user step": user, "mask step": mask,
             "user step, former": user_before, "mask step, former": mask_before}
    if args.no_former:
        steps = {name: fn for name, fn in steps.items() if "former" not in name}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in range(args.repeats + 2):
        for name, fn in steps.items():
            t = fn(step)
            if step >= 2:  # warm-up
                times[name].append(t)
    peaks, after = {}, {}
    for name, fn in steps.items():
        with AllocationPeak() as alloc:
            tracker[:] = [alloc, 0, 0]
            fn(args.repeats + 2)
        peaks[name] = max(tracker[1], alloc.peak)  # forward + backward, or what came after
        after[name] = alloc.peak - tracker[2]
        tracker.clear()
    base = statistics.median(times["plain fine-tuning step"])
    n_params = sum(p_.numel() for p_ in params.values())
    model_bytes = sum(p_.numel() * p_.element_size() for p_ in params.values())
    print(f"model: {args.model} on {args.device}; UNet {len(params)} tensors, {n_params:,} parameters ({model_bytes / 2**20:.1f} MiB); "
          f"batch {args.batch_size}; {args.repeats} interleaved repeats, medians; peak = bytes allocated by the step")
    print(f"{'':<26} {'time':>10} {'vs plain':>9} {'step peak':>11} {'after backward, beyond gradients':>34}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<26} {med * 1000:8.1f}ms {med / base:8.2f}x {peaks[name] / 2**20:8.1f}MiB "
              f"{after[name] / 2**20:12.2f}MiB = {after[name] / model_bytes:5.2f}x UNet size")
    print(f"the user's optimizer: {args.optimizer}")
    pairs = (("mask step", "mask step", "mask step, former"), ("user step", "guard-learning user step", "user step, former"))
    for kind, now, old in pairs if not args.no_former else ():
        print(f"{kind}: allocated after the backward, beyond the gradients, former -> today's: "
              f"{after[old] / model_bytes:.2f}x -> {after[now] / model_bytes:.2f}x the UNet "
              f"({after[old] / 2**20:.2f} -> {after[now] / 2**20:.2f} MiB); step peak "
              f"{peaks[old] / 2**20:.1f} -> {peaks[now] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
