"""Issue 10 (artstyle validity): the relearn recipe's teaching step with another optimiser. A research script,
run from the repository root. usage: artstyle_teach.py SEED STEPS SHARE LR EMA OUT_DIR

EMA 0: the recipe's own schedule (constant rate, no EMA); EMA > 0: the pre-training recipe's (cosine, 200
warm-up steps, EMA of that decay). Prints the taught base's and the UCE release's recognition rate on the
user's OpenMoji concepts and on the base families (100 samples). Session 6, seed 0, 2,000 steps, share 0.5:
lr 1e-3 without EMA 21% (base families 70%); lr 1e-3 with EMA 0.999 39% (89%); the recipe's lr 1e-4 53%."""
import sys
import time

import torch

import freezeasguard.training as training
from freezeasguard import zoo
from freezeasguard.bench import emoji, relearn
from freezeasguard.bench.evaluate import base_families_domain, evaluate, scenario_domains
from freezeasguard.model import DiffusionModel

seed, steps, share, lr, ema, out = (int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]),
                                    float(sys.argv[5]), sys.argv[6])
if ema > 0:
    recipe_config = training.TrainConfig

    def pretraining_schedule(**kw):  # relearn.prepare builds its TrainConfig through this module attribute
        return recipe_config(**{**kw, "lr_schedule": "cosine", "lr_warmup_steps": 200, "ema_decay": ema})

    training.TrainConfig = pretraining_schedule
sc = emoji.scenario("artstyle", seed)
rec = zoo.load_recogniser()
t0 = time.time()
dirs = relearn.prepare(sc, zoo.load_base, out, relearn.RelearnConfig(teach_steps=steps, base_share=share, teach_lr=lr),
                       progress=False)
print(f"prepare {time.time() - t0:.0f} s", flush=True)
for which in ("taught", "release"):
    m = DiffusionModel.from_pretrained(dirs[which], torch_dtype=torch.float32)
    doms = scenario_domains(sc, m.resolution)
    doms["base_families"] = base_families_domain(m.resolution)
    for d in ("illegal", "base_families"):
        r = evaluate(m, doms[d], rec, n_samples=100, seed=seed)[0]
        print(which, d, f"rate {100 * r['rate']:.1f}%", f"mean prob {100 * r['mean_prob']:.1f}%", flush=True)
