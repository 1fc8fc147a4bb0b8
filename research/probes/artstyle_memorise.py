"""Issue 10 (artstyle validity): is the OpenMoji style out of this UNet's reach, or out of the recipe's? A
research script, run from the repository root after the quick grid (`freezeasguard bench --config
docs/profiles/quick-grid.json --out runs/quick`), whose release it reads. usage: artstyle_memorise.py SEED LR STEPS

Full fine-tuning of the quick grid's artstyle release on the user's own OpenMoji images (the images the samples
are prompted with), past the profile's budget, evaluated on those prompts at 400 / 800 / 1,600 / 3,200 steps
(each stretch a fresh AdamW: a probe, not the bench's user). Session 7, seed 0, lr 1e-4: OpenMoji 61 / 60 / 55%
at 400 / 800 / 1,600 steps while the training loss fell 0.091 / 0.059 / 0.045; lr 1e-3: 53% at 400."""

import dataclasses
import sys
import time

import torch

from freezeasguard import zoo
from freezeasguard.bench import emoji
from freezeasguard.bench.evaluate import evaluate, scenario_domains
from freezeasguard.finetuning import FinetuneConfig, attacker_train_config, finetune
from freezeasguard.model import DiffusionModel

seed, lr, steps = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
sc = emoji.scenario("artstyle", seed)
rec = zoo.load_recogniser()
m = DiffusionModel.from_pretrained(f"runs/quick/relearn/artstyle-seed{seed}/release", torch_dtype=torch.float32)
doms = scenario_domains(sc, m.resolution)
user = emoji.dataset(sc.items("illegal", "user"), m.resolution, preload=True)
done = 0
for stop in [s for s in (400, 800, 1600, 3200) if s <= steps]:
    train = dataclasses.replace(
        attacker_train_config(), max_steps=stop - done, learning_rate=lr, progress=False, seed=seed + done
    )
    t0 = time.time()
    res = finetune(m, user, config=FinetuneConfig(method="full", train=train))
    done = stop
    r = evaluate(m, doms["illegal"], rec, n_samples=100, seed=seed)[0]
    print(
        f"lr {lr} step {done}: openmoji {100 * r['rate']:.0f}% prob {100 * r['mean_prob']:.0f}%  loss {sum(res.train.losses[-50:]) / 50:.4f} ({time.time() - t0:.0f}s)",
        flush=True,
    )
