"""Lever 6, measured before building it: freeze the top output channels by a one-shot illegal/legal gradient
ratio (parameter budget RATIO), enforce by restoring them after every optimizer step, and run the quick
profile's users (figures seed SEED, 400 illegal / 800 legal steps, 100 samples). usage: channels.py RATIO SEED [random]"""
import copy, json, sys, time
from pathlib import Path
import torch
from freezeasguard import zoo
from freezeasguard.bench.profiles import PROFILES
from freezeasguard.bench.cells import prepare_setting, USER_DOMAINS
from freezeasguard.baselines import _objective, _encoded, _batches
from freezeasguard.bench.evaluate import evaluate
from freezeasguard.finetuning import FinetuneConfig, finetune
from freezeasguard.training import TrainCallback, TrainConfig

ratio, seed = float(sys.argv[1]), int(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else "ratio"
p = PROFILES["quick"]
s = prepare_setting("figures", seed, p, Path("runs/quick"), zoo.load_base)
rel = s.load_release()

def channel_sq(model, data, sd):
    obj = _objective(model); enc = _encoded(model, data)
    params = dict(model.unet.named_parameters())
    for q in obj.parameters(): q.requires_grad_(False)
    for q in params.values(): q.requires_grad_(True); q.grad = None
    for b in _batches(enc, 4, 16, sd):
        (obj(b) / 4).backward()
    out = {}
    for n, q in params.items():
        g = q.grad.double().pow(2)
        out[n] = (g.reshape(g.shape[0], -1).sum(1) if g.dim() > 1 else g) / (q[0].numel() if q.dim() > 1 else 1)
        q.grad = None; q.requires_grad_(False)
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
    ill = channel_sq(rel, s.publisher_illegal, seed); leg = channel_sq(rel, s.publisher_legal, seed + 1)
    for n, q in params.items():
        r = (ill[n] / (leg[n] + 1e-30)).sqrt()
        for c in range(q.shape[0]):
            units.append((float(r[c]), n, c, q[0].numel() if q.dim() > 1 else 1))
units.sort(key=lambda u: -u[0])
budget, used, masks = ratio * total, 0, {n: torch.zeros(q.shape[0], dtype=torch.bool) for n, q in params.items()}
for sc, n, c, size in units:
    if used + size <= budget:
        masks[n][c] = True; used += size
touched = sum(1 for m in masks.values() if m.any()); whole = sum(1 for m in masks.values() if m.all())
print(f"frozen {used/total:.3f} of params; {touched} tensors touched, {whole} whole", flush=True)

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
res = {"ratio": ratio, "seed": seed, "mode": mode, "frozen_params": used / total, "tensors_touched": touched, "domains": {}}
for user, data in s.users.items():
    steps = p.steps if user == "illegal" else p.legal_steps
    tuned = copy.deepcopy(rel)
    before = {n: q.detach().clone() for n, q in tuned.unet.named_parameters()}
    cfg = FinetuneConfig(method="full", train=TrainConfig(max_steps=steps, batch_size=p.batch_size, learning_rate=p.lr, seed=seed, progress=False))
    t = time.time()
    finetune(tuned, data, guard=None, config=cfg, callbacks=[Restore(tuned)])
    after = dict(tuned.unet.named_parameters())
    assert all(torch.equal(after[n][m], before[n][m]) for n, m in masks.items() if m.any())
    for d in USER_DOMAINS[user]:
        met, _ = evaluate(tuned, s.domains[d], rec, n_samples=p.n_samples, seed=seed, sampling=p.sampling)
        res["domains"][d] = {"rate": met["rate"], "mean_prob": met["mean_prob"]}
        print(user, d, met["rate"], met["mean_prob"], f"{time.time()-t:.0f}s", flush=True)
Path(f"runs/probe5/channels-{mode}-{ratio:g}-seed{seed}.json").write_text(json.dumps(res, indent=1))
