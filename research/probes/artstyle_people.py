"""Issue 10 (artstyle validity): does a base taught the OpenMoji style draw it on people, which this model draws
well in Twemoji? A research script, run from the repository root. usage: artstyle_people.py MODEL_DIR [MODEL_DIR...]

Samples 96 seeded base people-family images' captions in OpenMoji and in Twemoji and prints the recogniser's
OpenMoji rate on each (and on the real OpenMoji images). Session 6, on the base taught by the recipe at lr 1e-4
for 2,000 steps (style on every base concept but the user's): 28% for OpenMoji prompts, 3% for Twemoji ones,
100% on the real images."""
import random
import sys

import torch

from freezeasguard.bench import emoji
from freezeasguard.bench.evaluate import SamplingConfig
from freezeasguard.model import load_model
from freezeasguard.zoo import load_recogniser

rec = load_recogniser()
s = SamplingConfig()
people = [it for it in emoji.scenario("artstyle", 0).items("base") if it.record.family is not None]
om = [emoji.Item(it.record, "openmoji") for it in people]
random.Random(0).shuffle(om)
om = om[:96]
tw = [emoji.Item(it.record, "twemoji") for it in om]


def openmoji_rate(images01):
    p = rec.predict(images01)["style"][:, rec.config.styles.index("openmoji")]
    return f"{100 * float((p > 0.5).float().mean()):.1f}% (mean prob {100 * float(p.mean()):.1f}%)"


d = emoji.dataset(om, 32, preload=True)
print("real OpenMoji people:", openmoji_rate(torch.stack([d[i]["pixel_values"] for i in range(len(d))]) / 2 + 0.5))
for name in sys.argv[1:]:
    m = load_model(name)
    for label, items in (("OpenMoji prompts", om), ("Twemoji prompts", tw)):
        g = m.sample([it.caption for it in items], seed=0, num_inference_steps=s.num_inference_steps,
                     guidance_scale=s.guidance_scale, sampler=s.sampler, batch_size=s.batch_size)
        print(name, label, openmoji_rate(g))
