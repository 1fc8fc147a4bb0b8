"""Issue 10 (artstyle validity): does classifier-free guidance bring out the OpenMoji style? A research script,
run from the repository root after the quick grid (`freezeasguard bench --config docs/profiles/quick-grid.json
--out runs/quick`), whose taught base and release it reads. usage: artstyle_guidance.py SEED

Samples the quick grid's taught artstyle base and its release on the user's OpenMoji prompts at guidance 1 to 12
(100 samples each) and prints the recogniser's OpenMoji rate. Session 7, seed 0: taught base 34 / 30 / 35 / 35 /
36% at guidance 1 / 3 / 5 / 7.5 / 12; release 21 / 19 / 13 / 8 / 12%."""

import sys

import torch

from freezeasguard import zoo
from freezeasguard.bench import emoji
from freezeasguard.bench.evaluate import SamplingConfig, evaluate, scenario_domains
from freezeasguard.model import DiffusionModel

seed = int(sys.argv[1])
sc = emoji.scenario("artstyle", seed)
rec = zoo.load_recogniser()
for which in ("teach/model", "release"):
    m = DiffusionModel.from_pretrained(f"runs/quick/relearn/artstyle-seed{seed}/{which}", torch_dtype=torch.float32)
    doms = scenario_domains(sc, m.resolution)
    for g in (1.0, 3.0, 5.0, 7.5, 12.0):
        r = evaluate(m, doms["illegal"], rec, n_samples=100, seed=seed, sampling=SamplingConfig(guidance_scale=g))[0]
        print(which, g, f"{100 * r['rate']:.0f}% prob {100 * r['mean_prob']:.0f}%", flush=True)
