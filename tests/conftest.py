from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
from PIL import Image

CAPTIONS = ["a red cat", "a green dog", "a blue tree", "a yellow house"]


def toy_images(n: int, side: int, seed: int = 0) -> list[Image.Image]:
    """Small images with structure (a coloured square on noise), so a model has something to learn."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = rng.integers(0, 60, (side, side, 3), dtype=np.uint8)
        colour = np.array([[255, 0, 0], [0, 200, 0], [0, 0, 255], [230, 230, 0]][i % 4], dtype=np.uint8)
        q = side // 4
        arr[q : 3 * q, q : 3 * q] = colour
        out.append(Image.fromarray(arr))
    return out


@pytest.fixture
def toy_data():
    """Factory: an ImageCaptionList of `n` toy images at `side` px."""
    from freezeasguard.data import ImageCaptionList, ImageTransform

    def make(n: int = 8, side: int = 16, random_flip: bool = True):
        captions = [CAPTIONS[i % 4] for i in range(n)]
        return ImageCaptionList(toy_images(n, side), captions, ImageTransform(side, random_flip=random_flip))

    return make


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from freezeasguard.tiny import TinySpec, write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-pixel", TinySpec(), seed=0)


@pytest.fixture(scope="session")
def tiny_latent_dir(tmp_path_factory):
    from freezeasguard.tiny import TinySpec, write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-latent", TinySpec(latent=True, resolution=32), seed=0)
