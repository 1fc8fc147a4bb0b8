"""Where a mask step's time goes, beside a plain fine-tuning step on the same 2-sample batch: forward, backward,
the mask's own passes (per-tensor dot products with d, the logit update, theta(m)'s move) against the plain
step's gradient clipping and SGD update. A research script, run from the repository root.
usage: mask_step_breakdown.py MODEL_DIR [THREADS] [PIXELS] [ORDER: p, m, w in the order run per repeat]
SD 1.5 shape at half width (`freezeasguard make-fixture --arch sd15 --width-divisor 2`, 215 M parameters, 256 px,
one thread, a bench beside it): forward 1.78 / 1.89 s, backward 3.93 / 4.04 s (plain / mask), the mask's own
passes 0.22 s against the plain step's clipping and update 0.17 s: the mask step's work beyond a forward and
backward is under 4% of a step; the rest of any measured gap is noise between repeats."""
import contextlib
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

from freezeasguard.data import ImageCaptionList, ImageTransform
from freezeasguard.learn import LearnConfig, MaskLearner, MixedData, add_scaled_, mask_logit_gradient
from freezeasguard.model import DiffusionModel
from freezeasguard.objective import DenoisingObjective, EncodedDataset
from freezeasguard.training import TrainConfig, TrainContext
from freezeasguard.training.core import make_accelerator

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
model = DiffusionModel.from_pretrained(sys.argv[1])
side = int(sys.argv[3]) if len(sys.argv) > 3 else 256
order = sys.argv[4] if len(sys.argv) > 4 else "pmw"
rng = np.random.default_rng(0)
imgs = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(4)]
ill = ImageCaptionList(imgs, ["a red cat"] * 4, ImageTransform(side))
leg = ImageCaptionList(imgs, ["a blue dog"] * 4, ImageTransform(side))
with torch.no_grad():
    ill, leg = EncodedDataset(model, ill), EncodedDataset(model, leg)
objective = DenoisingObjective(model)
for p_ in objective.parameters():
    p_.requires_grad_(False)
params = {f"unet.{n}": p for n, p in model.unet.named_parameters()}
for p_ in params.values():
    p_.requires_grad_(True)
d = torch.cat([p_.detach().reshape(-1) for p_ in params.values()]) * 1e-3
learner = MaskLearner(params, ill, leg, LearnConfig(mask_batch=2, mask_every=2), initial_d=d)
opt = torch.optim.SGD(list(params.values()), lr=1e-5)
acc = make_accelerator()
ctx = TrainContext(acc, objective, objective, opt, params, TrainConfig(batch_size=2))
learner.on_train_start(ctx)
mixed = MixedData(ill, leg)
times: dict[str, list[float]] = {}


@contextlib.contextmanager
def timed(name):
    t0 = time.perf_counter()
    yield
    times.setdefault(name, []).append(time.perf_counter() - t0)


def plain(step):
    batch = mixed.collate([mixed.example(0, step)])
    with timed("plain forward"):
        loss = objective(batch)
    with timed("plain backward"):
        loss.backward()
    with timed("plain clip + SGD"):
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def mask_parts(step):
    with timed("mask batch"):
        batch = learner._mask_batch(ctx)
    with timed("mask forward"):
        loss = ctx.model(batch)
    with timed("mask backward"):
        acc.backward(loss)
    with torch.no_grad(), timed("mask's own passes"):
        m_old = learner.m()
        g = mask_logit_gradient([p.grad for p in learner.params], learner.d_views, m_old, learner.temperature)
        for p in learner.params:
            p.grad = None
        learner._update_logits(g, m_old)
        add_scaled_(learner.params, learner.d_views, (learner.m().double() - m_old.double()).tolist())


def whole(step):
    with timed("mask step (the library's)"):
        learner.mask_step(ctx)


for step in range(5):
    for o in order:
        {"p": plain, "m": mask_parts, "w": whole}[o](step)
print(f"{sum(p.numel() for p in params.values()):,} parameters; medians of 4 after one warm-up")
for name, ts in times.items():
    print(f"{name:28s} {statistics.median(ts[1:]) * 1000:9.1f} ms")
