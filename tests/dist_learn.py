"""Run by test_distributed.py: learn a guard on the tiny model (1 or N processes), save its scores."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import CAPTIONS, toy_images  # noqa: E402
from freezeasguard.data import ImageCaptionList, ImageTransform  # noqa: E402
from freezeasguard.learn import LearnConfig, learn_guard  # noqa: E402
from freezeasguard.tiny import TinySpec, build_tiny_model  # noqa: E402
from freezeasguard.training import TrainConfig  # noqa: E402


def main(out: str, batch_size: int, accumulation: int) -> None:
    torch.set_num_threads(1)
    model = build_tiny_model(TinySpec(), seed=0)
    ill = ImageCaptionList(toy_images(8, 16), [CAPTIONS[i % 2] for i in range(8)], ImageTransform(16))
    leg = ImageCaptionList(toy_images(8, 16, seed=1), [CAPTIONS[2 + i % 2] for i in range(8)], ImageTransform(16))
    user = TrainConfig(batch_size=batch_size, gradient_accumulation=accumulation, learning_rate=1e-3, progress=False)
    warm = TrainConfig(max_steps=2, batch_size=batch_size, gradient_accumulation=accumulation, learning_rate=1e-3,
                       progress=False)
    cfg = LearnConfig(ratio=0.3, mask_every=2, mask_steps=3, mask_batch=4, mask_lr=0.05, user=user, warm_start=warm)
    guard = learn_guard(model, ill, leg, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as fh:
            json.dump({"frozen": list(guard.frozen), "scores": guard.scores,
                       "world": int(os.environ.get("WORLD_SIZE", "1"))}, fh)


if __name__ == "__main__":
    from freezeasguard.training import release_process_group

    try:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    finally:
        release_process_group()  # before interpreter exit: gloo aborts a rank left to it
