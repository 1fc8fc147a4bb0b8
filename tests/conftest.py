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


def check_train_metrics(m: dict, *, steps: int, global_batch: int, trainable_tensors: int,
                        trainable_parameters: int) -> None:
    """A run's metrics.json checked by value: counts exactly, times, memory and losses within physical ranges."""
    import math
    import os

    assert m["steps"] == steps and m["steps_run"] == steps - m["resumed_from"] and m["world_size"] == 1
    assert m["global_batch"] == global_batch
    assert m["trainable_tensors"] == trainable_tensors and m["trainable_parameters"] == trainable_parameters
    assert 0 < m["trainable_parameters"] <= m["objective_parameters"]
    if m["config"]["optimizer"] in ("adam", "adamw"):  # two float32 moments per element, a step count per tensor
        assert m["optimizer_state_bytes"] == 8 * trainable_parameters + 4 * trainable_tensors
    times = m["step_time_s"]
    assert all(0 < times[k] < 60 for k in ("first", "median", "mean_after_warmup")), times
    if m["device"].startswith("cuda"):  # the device's peak allocation: at least the trained weights themselves
        assert m["peak_memory_kind"] == "cuda_max_allocated"
        assert 4 * trainable_parameters <= m["peak_memory_bytes"]
    else:  # the run's peak resident set: above what torch alone occupies, within the machine, and not below the
        # resident set measured when the peak was reset
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        assert m["peak_memory_kind"] == "rss_peak"
        assert 50e6 < m["peak_memory_bytes"] <= ram and m["peak_memory_bytes"] >= m["rss_before_train_bytes"]
    # denoising MSE against unit-variance noise starts near 1
    assert all(math.isfinite(m["loss"][k]) and 0 < m["loss"][k] < 10 for k in ("first", "last")), m["loss"]


def without_sketches(guard):
    """A guard as the file an older freezeasguard wrote: version 1 without value sketches (checksum recomputed)."""
    import copy

    from freezeasguard.guard import _checksum

    data = copy.deepcopy(guard.to_dict())  # the guard's own records must keep their sketches
    data.pop("checksum")
    data.pop("sketch")
    for record in data["tensors"].values():
        record.pop("sketch")
    data["checksum"] = _checksum(data)
    return data
