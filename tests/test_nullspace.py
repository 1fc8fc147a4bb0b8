"""Text-blind frozen keys and values: after the release, no change to the trainable rest makes the UNet tell
apart two prompts that differ only in the projected directions (an analytic property, checked on the model)."""

from __future__ import annotations

import pytest
import torch

from freezeasguard.guard import unet_tensors
from freezeasguard.protections import ReleaseContext, protect
from freezeasguard.protections.components import reads_text
from freezeasguard.tiny import TinySpec, build_tiny_model


@pytest.fixture
def release(toy_data):
    ctx = ReleaseContext(build_tiny_model(TinySpec(), seed=0), toy_data(8), toy_data(8, random_flip=False), 0.0, seed=0)
    return protect("freeze-kv+nullspace", ctx, {"nullspace": {"rank": 4}})


def _projector(release):
    info = release.guard.provenance["nullspace"]["subspace"]
    assert info["rank"] == 4
    # the projected directions span the row space removed from every key/value weight
    weights = [p for n, p in release.model.unet.named_parameters() if reads_text(n)]
    base = {n: p for n, p in build_tiny_model(TinySpec(), seed=0).unet.named_parameters() if reads_text(n)}
    removed = torch.cat([b.detach().double() - w.detach().double() for w, b in zip(weights, base.values())])
    _, s, vh = torch.linalg.svd(removed, full_matrices=False)
    return vh[: int((s > 1e-6 * s[0]).sum())]  # [rank, D]


def test_no_trainable_change_lets_the_unet_read_the_projected_directions(release):
    model = release.model
    directions = _projector(release)
    assert directions.shape[0] == 4
    g = torch.Generator().manual_seed(0)
    text = model.encode_prompts(["a photo of a red cat"]).detach()
    shifted = text + (torch.randn(1, text.shape[1], 4, generator=g, dtype=torch.float64) @ directions).float() * 3.0
    frozen = set(release.guard.frozen)
    with torch.no_grad():  # an attacker's arbitrary values for everything the guard leaves trainable
        for name, p in unet_tensors(model.unet).items():
            if name not in frozen:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    noisy = torch.randn(1, model.unet.config.in_channels, model.unet.config.sample_size,
                        model.unet.config.sample_size, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        a = model.unet(noisy, t, encoder_hidden_states=text).sample
        b = model.unet(noisy, t, encoder_hidden_states=shifted).sample
        c = model.unet(noisy, t, encoder_hidden_states=text + 3.0 * torch.randn(text.shape, generator=g)).sample
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())
    assert not torch.allclose(a, c, atol=1e-2)  # a change outside the directions still reaches the UNet


def test_only_frozen_key_value_weights_change(release):
    base = dict(build_tiny_model(TinySpec(), seed=0).unet.named_parameters())
    moved = {n for n, p in release.model.unet.named_parameters() if not torch.equal(p, base[n])}
    assert moved and moved == {n for n in release.guard.frozen if reads_text(n)}
    release.guard.check_values(release.model.unet)


def test_a_frozen_set_without_key_value_weights_is_refused(toy_data):
    ctx = ReleaseContext(build_tiny_model(TinySpec(), seed=0), toy_data(4), toy_data(4, random_flip=False), 0.0)
    with pytest.raises(ValueError, match="key/value"):
        protect("freeze-time-embedding+nullspace", ctx, {"nullspace": {"rank": 2}})
    with pytest.raises(ValueError, match="needs a frozen set"):
        protect("nullspace", ctx)
