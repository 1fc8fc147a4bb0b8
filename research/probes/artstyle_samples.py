"""Issue 10 (artstyle validity) diagnosis: where does the OpenMoji style get lost? A research script, run from
the repository root. usage: artstyle_samples.py TAUGHT_MODEL_DIR OUT_DIR [SEED]

TAUGHT_MODEL_DIR is a base taught the style by the relearn recipe (`freezeasguard.bench.relearn`), for example
`relearn.prepare(emoji.scenario("artstyle", 0), zoo.load_base, DIR, RelearnConfig(teach_steps=2000,
base_share=0.5))` then DIR/teach/model.
Measures the recogniser's OpenMoji rate on (1) the user's real OpenMoji images, (2) their VAE round trip,
(3) the same downscaled to 16 px and back, (4) the taught model's samples for the user's OpenMoji prompts,
(5) its samples for the OpenMoji prompts it was taught (publisher side), (6) its samples for the user's
concepts in Twemoji; writes samples.png (rows: real user OpenMoji, samples of 4, 5 and 6, real publisher
OpenMoji) and rates.json."""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from freezeasguard.bench import emoji
from freezeasguard.bench.evaluate import SamplingConfig
from freezeasguard.model import load_model
from freezeasguard.zoo import load_recogniser

model_dir, out = sys.argv[1], Path(sys.argv[2])
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
out.mkdir(parents=True, exist_ok=True)
sc = emoji.scenario("artstyle", seed)
rec = load_recogniser()
model = load_model(model_dir)
s = SamplingConfig()


def real(items):
    d = emoji.dataset(items, 32, preload=True)
    return torch.stack([d[i]["pixel_values"] for i in range(len(d))])  # [-1, 1]


def openmoji_rate(images01):
    p = rec.predict(images01)["style"][:, rec.config.styles.index("openmoji")]
    return {"rate": float((p > 0.5).float().mean()), "mean_prob": float(p.mean()), "n": len(p)}


def samples(items):
    return model.sample([it.caption for it in items], seed=seed, num_inference_steps=s.num_inference_steps,
                        guidance_scale=s.guidance_scale, sampler=s.sampler, batch_size=s.batch_size)


user = sc.items("illegal", "user")
pub = sc.items("illegal", "publisher")
user_tw = [emoji.Item(it.record, "twemoji") for it in user]
x = real(user)
with torch.no_grad():
    lat = model.vae.encode(x).latent_dist.mode()
    rt = model.vae.decode(lat).sample.clamp(-1, 1)
blur = F.interpolate(F.interpolate(x, size=16, mode="bilinear", antialias=True), size=32, mode="bilinear")
gen_user, gen_pub, gen_tw = samples(user), samples(pub), samples(user_tw)
rates = {
    "real user OpenMoji": openmoji_rate(x / 2 + 0.5),
    "VAE round trip of them": openmoji_rate(rt / 2 + 0.5),
    "downscaled to 16 px and back": openmoji_rate(blur / 2 + 0.5),
    "samples, user's OpenMoji prompts": openmoji_rate(gen_user),
    "samples, taught (publisher) OpenMoji prompts": openmoji_rate(gen_pub),
    "samples, user's concepts in Twemoji (should be low)": openmoji_rate(gen_tw),
}
(out / "rates.json").write_text(json.dumps({"model": model_dir, "seed": seed, "rates": rates}, indent=1))
n = 16
rows = [x[:n] / 2 + 0.5, gen_user[:n], gen_pub[:n], gen_tw[:n], real(pub[:n]) / 2 + 0.5]
grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1).clamp(0, 1)
a = (grid.permute(1, 2, 0).numpy() * 255).astype("uint8")
Image.fromarray(a).resize((a.shape[1] * 2, a.shape[0] * 2), Image.NEAREST).save(out / "samples.png")
for k, v in rates.items():
    print(f"{k}: {100 * v['rate']:.1f}% (mean prob {100 * v['mean_prob']:.1f}%, n={v['n']})")
