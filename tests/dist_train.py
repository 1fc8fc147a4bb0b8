"""Run by test_distributed.py under `accelerate launch`: train the tiny model, save the UNet weights."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from conftest import CAPTIONS, toy_images  # noqa: E402
from freezeasguard.data import ImageCaptionList, ImageTransform  # noqa: E402
from freezeasguard.objective import DenoisingObjective  # noqa: E402
from freezeasguard.tiny import TinySpec, build_tiny_model  # noqa: E402
from freezeasguard.training import TrainConfig, train  # noqa: E402


def main(out: str, batch_size: int, accumulation: int) -> None:
    torch.set_num_threads(1)
    model = build_tiny_model(TinySpec(), seed=0)
    data = ImageCaptionList(toy_images(8, 16), [CAPTIONS[i % 4] for i in range(8)], ImageTransform(16, random_flip=True))
    objective = DenoisingObjective(model, caption_dropout=0.2)
    unet = {f"unet.{n}": p for n, p in model.unet.named_parameters()}
    cfg = TrainConfig(max_steps=4, batch_size=batch_size, gradient_accumulation=accumulation, learning_rate=1e-3,
                      progress=False, seed=11)
    result = train(objective, data, unet, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({n: p.detach().contiguous() for n, p in model.unet.named_parameters()}, out)
        print("world", result.metrics["world_size"], "global batch", result.metrics["global_batch"], "losses", result.losses)


if __name__ == "__main__":
    from freezeasguard.training import release_process_group

    try:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    finally:
        release_process_group()  # before interpreter exit: gloo aborts a rank left to it
