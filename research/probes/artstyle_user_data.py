"""Artstyle on the style base: why full relearning falls after its first 50-200 steps, and whether a user with
more of the artist's works keeps it. A research script, run from the repository root after the artstyle
validity cells (`freezeasguard bench --config docs/profiles/artstyle-default-attacker.json --method none --out
runs/artstyle`), whose release it reads. usage: artstyle_user_data.py SEED N_EXTRA [LR] [OUT]

Full fine-tuning of the release (the bench's default attacker: AdamW, batch 32, 400 steps) on the user's 64
OpenMoji images plus N_EXTRA more from the artstyle reserve (the first in a seeded order that are not the
user's), scored on the user's own 64 OpenMoji prompts at 25 / 50 / 100 / 200 / 400 steps, 100 samples each.
The extra concepts were in the taught base's OpenMoji teaching (only the user's 64 are held out of it), so
this probes the data size of the relearn, not a new scenario. Writes OUT/record.json and a sample grid per
evaluation step."""
import dataclasses
import sys
import time
from pathlib import Path

import torch

from freezeasguard import zoo
from freezeasguard.bench import emoji
from freezeasguard.bench.cells import _Checkpoints
from freezeasguard.bench.evaluate import evaluate, scenario_domains
from freezeasguard.finetuning import FinetuneConfig, attacker_train_config, finetune
from freezeasguard.model import DiffusionModel
from freezeasguard.utils.files import atomic_write_json

seed, n_extra = int(sys.argv[1]), int(sys.argv[2])
lr = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-4
out = Path(sys.argv[4] if len(sys.argv) > 4 else f"runs/probe/artstyle-user-data-{seed}-{n_extra}-{lr:g}")
out.mkdir(parents=True, exist_ok=True)
sc = emoji.scenario("artstyle", seed)
rec = zoo.load_recogniser(zoo.EMBEDDED_STYLE)
model = DiffusionModel.from_pretrained(f"runs/artstyle/relearn/artstyle-seed{seed}/release", torch_dtype=torch.float32)
doms = scenario_domains(sc, model.resolution)
user = list(sc.items("illegal", "user"))
mine = {it.concept for it in user}
reserve = emoji.artstyle_reserve()
pool = [it for it in emoji.base_items(seed) if it.concept in reserve and it.concept not in mine]
extra = [emoji.Item(it.record, "openmoji") for it in pool[:n_extra]]
data = emoji.dataset(user + extra, model.resolution, preload=True)
record: dict = {"seed": seed, "n_user": len(user), "n_extra": len(extra), "lr": lr, "points": []}


def score(step: int, n: int) -> None:
    t0 = time.time()
    r, images = evaluate(model, doms["illegal"], rec, n_samples=n, seed=seed)[:2]
    record["points"].append({"step": step, "rate": r["rate"], "mean_prob": r["mean_prob"], "n": r["n"],
                             "seconds": time.time() - t0})
    if images is not None:
        from PIL import Image

        grid = torch.cat(list(images[:16].permute(0, 2, 3, 1)), dim=1).clamp(0, 1)
        Image.fromarray((grid.numpy() * 255).astype("uint8")).save(out / f"samples-{step}.png")
    print(f"step {step}: openmoji {100 * r['rate']:.1f}% prob {100 * r['mean_prob']:.1f}%", flush=True)
    atomic_write_json(out / "record.json", record)


train = dataclasses.replace(attacker_train_config(), learning_rate=lr, seed=seed, progress=True)
t0 = time.time()
finetune(model, data, config=FinetuneConfig(method="full", train=train),
         callbacks=[_Checkpoints({s: 100 for s in (25, 50, 100, 200, 400)}, score)])
record["seconds"] = time.time() - t0
atomic_write_json(out / "record.json", record)
