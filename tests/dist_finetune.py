"""Run by test_distributed.py under torchrun: `finetune` with no explicit accelerator, every rank into the same
output directory. Each rank records whether it wrote the outputs and whether they existed when it returned."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.dirname(__file__))
import freezeasguard.finetuning as ft  # noqa: E402
from conftest import CAPTIONS, toy_images  # noqa: E402
from freezeasguard.data import ImageCaptionList, ImageTransform  # noqa: E402
from freezeasguard.tiny import TinySpec, build_tiny_model  # noqa: E402
from freezeasguard.training import TrainConfig  # noqa: E402


def main(out: str, record_dir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    saved_by_me = []
    real_save = ft._save

    def spy(*args, **kwargs):
        saved_by_me.append(rank)
        return real_save(*args, **kwargs)

    ft._save = spy
    model = build_tiny_model(TinySpec(), seed=0)
    data = ImageCaptionList(toy_images(4, 16), [CAPTIONS[i % 4] for i in range(4)], ImageTransform(16))
    cfg = ft.FinetuneConfig(train=TrainConfig(max_steps=1, batch_size=1, learning_rate=1e-3, progress=False))
    result = ft.finetune(model, data, config=cfg, output_dir=out)
    Path(record_dir, f"rank{rank}.json").write_text(json.dumps({
        "saved": bool(saved_by_me), "outputs_exist_on_return": (Path(out) / "finetune.json").is_file(),
        "output": str(result.output), "world": result.train.metrics["world_size"]}))


if __name__ == "__main__":
    from freezeasguard.training import release_process_group

    try:
        main(sys.argv[1], sys.argv[2])
    finally:
        release_process_group()  # before interpreter exit: gloo aborts a rank left to it
