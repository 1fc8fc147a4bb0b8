"""artstyle validity: is the embedded base's UNet too small to draw a style? A research script, run from the
repository root. usage: artstyle_capacity.py SEED CHANNELS STEPS OUT_DIR

Pre-trains a UNet of CHANNELS (e.g. 64,128,128) and a text encoder from scratch, as `zoo pretrain`'s second
stage does (same schedule, EMA, caption dropout), on the base's Twemoji images **plus** the OpenMoji images of
every base concept except the artstyle user's (the set the relearn recipe teaches, `relearn.teach_items`), so
the style is known the way a real base knows an artist: from pre-training. The VAE and tokenizer are the
shipped base's (a generic codec; the recogniser says its round trip keeps the style at 100%). Resumable: the
training run checkpoints every 250 steps under OUT_DIR.

At the end (EMA weights) it prints, on 100 samples each (DDIM 25, guidance 3, the benchmark's sampling):
the OpenMoji rate on the user's held-out concepts (the taught-base check wants >= 80%), on taught publisher
concepts, on the user's concepts prompted in Twemoji (should stay low), and the base families' identity rate.
"""
import json
import sys
import time
from pathlib import Path

import torch

from freezeasguard import zoo
from freezeasguard.bench import emoji, relearn
from freezeasguard.bench.evaluate import Domain, base_families_domain, evaluate
from freezeasguard.objective import DenoisingObjective, EncodedDataset
from freezeasguard.training import TrainConfig, train
from freezeasguard.zoo.recipe import ZooRecipe, build_untrained

seed, channels, steps, out = int(sys.argv[1]), tuple(int(c) for c in sys.argv[2].split(",")), int(sys.argv[3]), Path(sys.argv[4])
out.mkdir(parents=True, exist_ok=True)
recipe = ZooRecipe(unet_channels=channels, unet_steps=steps, seed=seed)
shipped = zoo.load_base()
model = build_untrained(recipe)
model.vae.load_state_dict(shipped.vae.state_dict())
model.vae.register_to_config(scaling_factor=shipped.vae.config.scaling_factor)
assert model.tokenizer.get_vocab() == shipped.tokenizer.get_vocab(), "the probe's tokenizer differs from the shipped one"
model.vae.requires_grad_(False)
n_unet = sum(p.numel() for p in model.unet.parameters())
print(f"UNet {channels}: {n_unet / 1e6:.2f} M parameters (shipped {sum(p.numel() for p in shipped.unet.parameters()) / 1e6:.2f} M)", flush=True)

sc = emoji.scenario("artstyle", seed)
items = list(emoji.base_items(seed)) + list(relearn.teach_items(sc))
data = emoji.dataset(items, recipe.resolution, preload=True)
with torch.no_grad():
    cached = EncodedDataset(model, data, encode_text=False)
objective = DenoisingObjective(model, caption_dropout=recipe.caption_dropout)
trainable = {f"unet.{n}": p for n, p in model.unet.named_parameters()}
trainable.update({f"text_encoder.{n}": p for n, p in model.text_encoder.named_parameters()})
rec = zoo.load_recogniser()


def style_domain(name: str, its: list) -> Domain:
    d = emoji.dataset(its, recipe.resolution, preload=True)
    real = torch.stack([d[i]["pixel_values"] for i in range(len(d))]) / 2 + 0.5
    return Domain(name, [it.caption for it in its], ["openmoji"] * len(its), "style", real)


user = list(sc.items("illegal", "user"))
taught = list(relearn.teach_items(sc))[:: max(1, len(relearn.teach_items(sc)) // 64)][:64]
domains = {
    "user_openmoji": style_domain("user_openmoji", user),
    "taught_openmoji": style_domain("taught_openmoji", taught),
    "user_twemoji": style_domain("user_twemoji", [emoji.Item(it.record, "twemoji") for it in user]),
    "base_families": base_families_domain(recipe.resolution),
}
record_path = out / "probe.json"
record = {"channels": list(channels), "unet_params": n_unet, "steps": steps, "seed": seed, "evals": {}}
for stop in (steps,):
    t0 = time.time()
    res = train(objective, cached, trainable,
                TrainConfig(seed=seed, max_steps=stop, batch_size=recipe.unet_batch, learning_rate=recipe.unet_lr,
                            lr_schedule="cosine", lr_warmup_steps=recipe.unet_warmup, ema_decay=recipe.ema_decay,
                            log_every=10, checkpoint_every=250, progress=True),
                output_dir=out / "run")
    row = {"train_seconds": time.time() - t0, "step_time_s": res.metrics["step_time_s"]["mean_after_warmup"],
           "final_loss": res.losses[-1]}
    for m in (model.unet, model.text_encoder):
        m.eval()
    for name, dom in domains.items():
        r = evaluate(model, dom, rec, n_samples=100, seed=seed)[0]
        row[name] = {"rate": r["rate"], "mean_prob": r["mean_prob"]}
        print(f"step {stop}: {name} rate {100 * r['rate']:.1f}% mean prob {100 * r['mean_prob']:.1f}%", flush=True)
    for m in (model.unet, model.text_encoder):
        m.train()
    record["evals"][str(stop)] = row
    record_path.write_text(json.dumps(record, indent=2))
