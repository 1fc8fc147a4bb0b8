"""Lever 6, measured before building it: freeze the top output channels by a one-shot illegal/legal gradient
ratio (parameter budget RATIO), enforce by restoring them after every optimizer step, and run the quick
grid's users (figures seed SEED, 400 illegal / 800 legal steps, 100 samples: docs/profiles/quick-grid.json).
A research script, run from the repository root. usage: channel_freeze_probe.py RATIO SEED [random]

Its own directory, runs/probes/channel-freeze, holds the taught base and release it builds (the bench's recipe
and seed) and its result, channels-MODE-RATIO-seedSEED.json. Session 4, 0.3, seed 0: 610 tensors partly frozen,
none whole; illegal 99%, legal impact 2.5% (near) / 7.0% (far) against the grid's full fine-tune."""

import copy
import json
import sys
import time
from pathlib import Path

import torch

from freezeasguard import zoo
from freezeasguard.bench.cells import USER_DOMAINS, prepare_setting
from freezeasguard.bench.evaluate import evaluate
from freezeasguard.bench.profiles import BenchProfile
from freezeasguard.finetuning import FinetuneConfig, finetune
from freezeasguard.protections.common import encoded, objective_of, seeded_batches
from freezeasguard.training import TrainCallback, TrainConfig

ratio, seed = float(sys.argv[1]), int(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else "ratio"
p = BenchProfile.load("docs/profiles/quick-grid.json")
run_dir = Path("runs/probes/channel-freeze")
s = prepare_setting("figures", seed, p, run_dir, zoo.load_base)
rel = s.load_release()


def channel_sq(model, data, sd):
    obj = objective_of(model)
    enc = encoded(model, data)
    params = dict(model.unet.named_parameters())
    for q in obj.parameters():
        q.requires_grad_(False)
    for q in params.values():
        q.requires_grad_(True)
        q.grad = None
    for b in seeded_batches(enc, 4, 16, sd):
        (obj(b) / 4).backward()
    out = {}
    for n, q in params.items():
        g = q.grad.double().pow(2)
        out[n] = (g.reshape(g.shape[0], -1).sum(1) if g.dim() > 1 else g) / (q[0].numel() if q.dim() > 1 else 1)
        q.grad = None
        q.requires_grad_(False)
    return out


params = dict(rel.unet.named_parameters())
total = sum(q.numel() for q in params.values())
units = []  # (score, name, channel, size)
if mode == "random":
    g = torch.Generator().manual_seed(seed)
    for n, q in params.items():
        for c in range(q.shape[0]):
            units.append((float(torch.rand((), generator=g)), n, c, q[0].numel() if q.dim() > 1 else 1))
else:
    ill = channel_sq(rel, s.publisher_illegal, seed)
    leg = channel_sq(rel, s.publisher_legal, seed + 1)
    for n, q in params.items():
        r = (ill[n] / (leg[n] + 1e-30)).sqrt()
        for c in range(q.shape[0]):
            units.append((float(r[c]), n, c, q[0].numel() if q.dim() > 1 else 1))
units.sort(key=lambda u: -u[0])
budget, used, masks = ratio * total, 0, {n: torch.zeros(q.shape[0], dtype=torch.bool) for n, q in params.items()}
for _score, n, c, size in units:
    if used + size <= budget:
        masks[n][c] = True
        used += size
touched = sum(1 for m in masks.values() if m.any())
whole = sum(1 for m in masks.values() if m.all())
print(f"frozen {used / total:.3f} of params; {touched} tensors touched, {whole} whole", flush=True)


class Restore(TrainCallback):
    name = "restore-channels"

    def __init__(self, model):
        self.p = dict(model.unet.named_parameters())
        self.keep = {n: (m, self.p[n].detach()[m].clone()) for n, m in masks.items() if m.any()}

    def on_step_end(self, ctx):
        with torch.no_grad():
            for n, (m, v) in self.keep.items():
                self.p[n][m] = v


rec = zoo.load_recogniser()
res = {
    "ratio": ratio,
    "seed": seed,
    "mode": mode,
    "frozen_params": used / total,
    "tensors_touched": touched,
    "domains": {},
}
for user, data in s.users.items():
    steps = p.steps if user == "illegal" else p.legal_steps
    tuned = copy.deepcopy(rel)
    before = {n: q.detach().clone() for n, q in tuned.unet.named_parameters()}
    cfg = FinetuneConfig(
        method="full",
        train=TrainConfig(max_steps=steps, batch_size=p.batch_size, learning_rate=p.lr, seed=seed, progress=False),
    )
    t = time.time()
    finetune(tuned, data, guard=None, config=cfg, callbacks=[Restore(tuned)])
    after = dict(tuned.unet.named_parameters())
    assert all(torch.equal(after[n][m], before[n][m]) for n, m in masks.items() if m.any())
    for d in USER_DOMAINS[user]:
        met, _ = evaluate(tuned, s.domains[d], rec, n_samples=p.n_samples, seed=seed, sampling=p.sampling)
        res["domains"][d] = {"rate": met["rate"], "mean_prob": met["mean_prob"]}
        print(user, d, met["rate"], met["mean_prob"], f"{time.time() - t:.0f}s", flush=True)
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / f"channels-{mode}-{ratio:g}-seed{seed}.json").write_text(json.dumps(res, indent=1))
