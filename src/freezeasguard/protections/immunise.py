"""Immunised frozen values: the publisher chooses what the frozen tensors hold, not only which tensors freeze.

A guard fixes a set F of UNet tensors at their released values. FreezeAsGuard releases them as they are; here
the released values of F are optimised so that a user who fine-tunes the trainable rest
on the illegal domain learns it badly, while the legal domain stays learnable. It is IMMA's game (a simulated
attacker re-learns, the defender ascends the attacked model's loss) restricted to F, where IMMA's weakness
goes away: the user's fine-tuning cannot move F back.

One round, `steps` times:
1. the simulated attacker (AdamW on the trainable rest, the benchmark user's learning rate) takes a step on
   an illegal batch; every `reset_every` steps it restarts from the release, since a relearn's first steps are
   what freezing has to slow;
2. the frozen values take an Adam step on  -L_illegal + legal_weight * L_legal  at the attacked model, then
   are pulled back into a trust region (each tensor within `max_change` of its norm from the release), so the
   release stays the model the publisher unlearned and checked.
The trainable rest is restored to the release at the end: only F changes, and the guard records F's new
values.

With `unroll_steps=k` the defender looks ahead: L_illegal is taken after k further attacker steps from the
attacker's current state, each differentiated through (second order), so the values learn to make the
attacker's next updates useless and not only its current loss high (the meta-learning form of MLAC / TAR;
sound here because the user cannot move the frozen set back). The unrolled steps are Adam-like in size: each
moves every trainable tensor by `unroll_lr` times its gradient over the gradient's root mean square.

With `legal_at="user"` a simulated legal user (its own copy of the rest, its own AdamW, reset with the
attacker) takes a step on a legal batch each round, and L_legal is taken at its model instead.

Cost: three forward/backward passes of the UNet per step (four with a legal user), no model copy beyond the
rest's release values (and the legal user's copy); with `unroll_steps=k`, k + 1 more forward passes whose
graphs are kept and differentiated twice (about 3k more passes' time, and k copies of the rest in memory).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..configs import strict_from_dict
from ..seeding import (
    STREAM_ATTACK_CAPTIONS,
    STREAM_ATTACK_HORIZON,
    STREAM_ATTACK_OPTIMIZER,
    STREAM_ATTACK_RATE,
    derive_seed,
)
from .components import component_names, reads_text
from .registry import Release, ReleaseContext, register

# The three batch streams of one immunisation (seeded_batches' `stream`).
STREAM_ATTACK, STREAM_DEFEND, STREAM_LEGAL, STREAM_UNROLL = 0, 1, 2, 3


@dataclass
class ImmuniseConfig:
    # Defaults: token-selective immunising, the best trade-off measured (docs/results.md; figures, all
    # cross-attention frozen): mitigation 65% / 82% on seeds 0 / 1 at a legal impact of -4% / -1% (near) and
    # 8% / 5% (far). The unrestricted game (text_subspace=0, lr=1e-3, max_change=0.3) mitigates 89% / 77% but
    # costs legal learning 36-67%.
    steps: int = 200
    lr: float = 0.05  # Adam on the frozen values; confined to a few directions, they need a large step
    attack_lr: float = 1e-4  # the simulated attacker: the benchmark user's AdamW rate
    # > 1: each restart draws the attacker's rate log-uniformly in [attack_lr, attack_lr * attack_lr_spread]
    # (seeded), so the values are not tuned to one rate: a user at 5x the rate relearned 61% against 35%.
    attack_lr_spread: float = 1.0
    reset_every: int = 25  # attacker steps before it restarts from the release
    # > reset_every: each restart draws its horizon log-uniformly in [reset_every, reset_every_max] (seeded), so
    # the values meet attackers far into a relearn, not only its first steps. 0: every horizon is reset_every.
    reset_every_max: int = 0
    # The simulated attacker's optimizer, drawn per restart from this list (seeded): "adamw" at the drawn rate,
    # "sgd" (momentum 0.9, no weight decay) at the drawn rate x sgd_lr_scale (SGD needs larger steps: the
    # battery's SGD attacker runs at 100x the default AdamW rate).
    attack_optimizers: tuple[str, ...] = ("adamw",)
    sgd_lr_scale: float = 100.0
    # Clip the simulated attacker's gradient norm, as the guarded path clips every user's (TrainConfig's
    # max_grad_norm, 1.0 by default); None: no clipping (the setting every recorded immunised release used).
    attack_max_grad_norm: float | None = None
    # What the simulated attacker calls the protected images. "given": the publisher's captions. "random": at each
    # restart every distinct illegal caption becomes `random_caption_words` made-up words that no publisher caption
    # contains (seeded), in the attacker's training batches and in the defender's illegal loss alike, so that
    # what is immunised is what the UNet needs to draw the protected images, not what the publisher's words
    # point at (a renamed-caption attacker walks past values tuned to those words).
    attack_captions: str = "given"
    random_caption_words: int = 2
    # > 0: the defender's illegal loss is taken after this many unrolled attacker steps, differentiated through
    # (see the module doc); each unrolled step moves a tensor by unroll_lr x its gradient / the gradient's RMS
    # (None: the simulated attacker's own rate at this restart, the size of an AdamW step at that rate).
    unroll_steps: int = 0
    unroll_lr: float | None = None
    batch_size: int = 16
    legal_weight: float = 1.0  # the defender's objective: -L_illegal + legal_weight * L_legal
    max_change: float = 1.0  # per frozen tensor: |released - original| <= max_change * |original|
    # Where L_legal is taken. "attacked": at the illegal attacker's model (IMMA's form). "user": at a simulated
    # legal user, a second copy of the rest fine-tuned on the legal sample from the release (measured worse:
    # legal impact 57-100% near, 74% far).
    legal_at: str = "attacked"
    # > 0: token-selective immunising. Only the cross-attention K/V tensors (the ones that read the text) move,
    # and only along the `text_subspace` directions of text-embedding space where the publisher's illegal
    # captions carry the most energy relative to the legal ones (generalised eigenvectors), so that legal
    # prompts' keys and values stay as released, and orthogonal to the empty prompt, so that the unconditional
    # branch of guided sampling stays as released. Other frozen tensors keep their released values.
    # 0: every frozen tensor moves freely (IMMA's game restricted to the frozen set).
    text_subspace: int = 8
    # Token-selective only: keep the subspace orthogonal to the empty prompt's directions, so the unconditional
    # branch of guided sampling stays as released (False: measured worse, docs/results.md).
    hold_empty_prompt: bool = True
    # Token-selective only: True also moves the frozen tensors outside cross-attention, freely, at their own
    # step size and trust region (the image-side tensors a selection such as `immunise-select` added to the frozen
    # set); False keeps them as released. Cross-attention's queries and outputs stay as released either way.
    free_tensors: bool = False
    # A free tensor moves in every direction, not in a few: `lr` (sized for the text subspace) at
    # max_change 1.0 wrecks the model (measured: a denoising loss of 4-22 against 0.1 at the first user's steps).
    # The unrestricted game's measured settings were 1e-3 and 0.3; the trust region here is tighter, since these
    # tensors also carry legal learning.
    free_lr: float = 1e-3
    free_max_change: float = 0.05

    def __post_init__(self) -> None:
        if self.text_subspace < 0:
            raise ValueError(f"ImmuniseConfig.text_subspace must be >= 0, got {self.text_subspace}")
        for name in ("steps", "reset_every", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImmuniseConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "attack_lr", "max_change", "free_lr", "free_max_change"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ImmuniseConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.attack_lr_spread >= 1.0:
            raise ValueError(f"ImmuniseConfig.attack_lr_spread must be >= 1, got {self.attack_lr_spread}")
        if self.reset_every_max and self.reset_every_max < self.reset_every:
            raise ValueError(f"ImmuniseConfig.reset_every_max must be 0 or >= reset_every ({self.reset_every}), "
                             f"got {self.reset_every_max}")
        self.attack_optimizers = tuple(self.attack_optimizers)
        bad = [o for o in self.attack_optimizers if o not in ATTACK_OPTIMIZERS]
        if not self.attack_optimizers or bad:
            raise ValueError(f"ImmuniseConfig.attack_optimizers must name one or more of {ATTACK_OPTIMIZERS}, "
                             f"got {list(self.attack_optimizers)}")
        if self.attack_max_grad_norm is not None and not self.attack_max_grad_norm > 0:
            raise ValueError(f"ImmuniseConfig.attack_max_grad_norm must be > 0 or None, got {self.attack_max_grad_norm}")
        if not self.sgd_lr_scale > 0:
            raise ValueError(f"ImmuniseConfig.sgd_lr_scale must be > 0, got {self.sgd_lr_scale}")
        if self.attack_captions not in ATTACK_CAPTIONS:
            raise ValueError(f"ImmuniseConfig.attack_captions must be one of {ATTACK_CAPTIONS}, "
                             f"got {self.attack_captions!r}")
        if self.random_caption_words < 1:
            raise ValueError(f"ImmuniseConfig.random_caption_words must be >= 1, got {self.random_caption_words}")
        if self.unroll_steps < 0 or (self.unroll_lr is not None and not self.unroll_lr > 0):
            raise ValueError(f"ImmuniseConfig.unroll_steps must be >= 0 and unroll_lr > 0, got {self.unroll_steps} "
                             f"and {self.unroll_lr}")
        if self.unroll_steps and self.legal_at == "user":
            raise ValueError("ImmuniseConfig.unroll_steps needs legal_at='attacked' (the legal user is not unrolled)")
        if self.legal_at not in ("attacked", "user"):
            raise ValueError(f"ImmuniseConfig.legal_at must be 'attacked' or 'user', got {self.legal_at!r}")
        if self.legal_weight < 0:
            raise ValueError(f"ImmuniseConfig.legal_weight must be >= 0, got {self.legal_weight}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attack_optimizers"] = list(self.attack_optimizers)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImmuniseConfig:
        return strict_from_dict(cls, data)


ATTACK_OPTIMIZERS = ("adamw", "sgd")
ATTACK_CAPTIONS = ("given", "random")


def _draw(seed: int, stream: int, step: int) -> float:
    """A uniform number in [0, 1): the draw of restart `step` on `stream`, a function of (seed, stream, step)."""
    return float(torch.rand((), generator=torch.Generator().manual_seed(derive_seed(seed, stream, step))))


def attacker_at_restart(cfg: ImmuniseConfig, seed: int, step: int) -> tuple[float, str, int]:
    """(learning rate, optimizer, horizon) of the simulated attacker that restarts at `step` (see the config)."""
    rate = cfg.attack_lr
    if cfg.attack_lr_spread > 1.0:
        rate = cfg.attack_lr * cfg.attack_lr_spread ** _draw(seed, STREAM_ATTACK_RATE, step)
    optimizer = cfg.attack_optimizers[0]
    if len(cfg.attack_optimizers) > 1:
        optimizer = cfg.attack_optimizers[int(_draw(seed, STREAM_ATTACK_OPTIMIZER, step) * len(cfg.attack_optimizers))]
    horizon = cfg.reset_every
    if cfg.reset_every_max > cfg.reset_every:
        u = _draw(seed, STREAM_ATTACK_HORIZON, step)
        horizon = int(round(cfg.reset_every * (cfg.reset_every_max / cfg.reset_every) ** u))
    return rate, optimizer, horizon


def random_captions(captions: list[str], forbidden: list[str], seed: int, restart: int, words: int) -> dict[str, str]:
    """Each distinct caption of `captions` -> `words` made-up words, a function of (seed, restart), none of
    them a word of a `forbidden` caption (the publisher's)."""
    from ..attacks.captions import made_up_word

    banned = {w for c in forbidden for w in re.findall(r"\w+", c.lower())}
    text = " ".join(sorted(banned))
    base = derive_seed(seed, STREAM_ATTACK_CAPTIONS, restart)
    out, used = {}, set()
    for i, caption in enumerate(sorted(set(captions))):
        chosen: list[str] = []
        attempt = 0
        while len(chosen) < words:
            word = made_up_word(base, i * 1000 + attempt, text)
            attempt += 1
            if word not in banned and word not in used:
                chosen.append(word)
                used.add(word)
        out[caption] = " ".join(chosen)
    return out


def recaptioned(model: Any, data: Any, names: dict[str, str]) -> Any:
    """`data` (an EncodedDataset) with each caption replaced by `names[caption]`, its text embeddings encoded
    again; the latents are shared, so the same seeds draw the same images."""
    new = copy.copy(data)
    new.captions = [names[c] for c in data.captions]
    new.unique_captions = sorted(set(new.captions))
    position = {c: i for i, c in enumerate(new.unique_captions)}
    new.caption_index = [position[c] for c in new.captions]
    with torch.no_grad():
        enc = model.encode_text(new.unique_captions)
    new.embeddings = enc.hidden.to("cpu")
    new.pooled = enc.pooled.to("cpu") if enc.pooled is not None else None
    return new


def unrolled_loss(loss: Callable[[dict[str, torch.Tensor], Any], torch.Tensor], start: dict[str, torch.Tensor],
                  batches: list[Any], final: Any, lr: float) -> torch.Tensor:
    """loss(theta_k, final) after k = len(batches) attacker steps from `start`, each
    theta <- theta - lr * g / rms(g) per tensor (g the gradient of loss(theta, batch)), kept in the graph, so
    that the result differentiates, through every step, in whatever `loss` reads besides theta (the frozen
    values). `loss(params, batch)`: the loss with the trainable tensors `params` substituted."""
    theta = {n: t.detach().requires_grad_(True) for n, t in start.items()}
    for batch in batches:
        grads = torch.autograd.grad(loss(theta, batch), list(theta.values()), create_graph=True)
        theta = {n: t - lr * g / (g.pow(2).mean().sqrt() + 1e-12) for (n, t), g in zip(theta.items(), grads)}
    return loss(theta, final)


def _attack_optimizer(name: str, params: list[torch.nn.Parameter], rate: float, cfg: ImmuniseConfig) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=rate * cfg.sgd_lr_scale, momentum=0.9)
    return torch.optim.AdamW(params, lr=rate)


def _set_grads(params: list[torch.Tensor], loss: torch.Tensor) -> None:
    for p, g in zip(params, torch.autograd.grad(loss, params)):
        p.grad = g


def pull_into_trust_region_(values: list[torch.Tensor], origins: list[torch.Tensor], max_change: float) -> None:
    """Each tensor moved back toward its origin so that |v - o| <= max_change * |o| (in place): a tensor that
    was zero stays zero."""
    with torch.no_grad():
        for v, o in zip(values, origins):
            delta = v - o
            cap = max_change * float(o.norm())
            norm = float(delta.norm())
            if norm > cap:
                v.copy_(o + delta * (cap / norm))


def illegal_text_subspace(illegal_embeddings: torch.Tensor, legal_embeddings: torch.Tensor, rank: int,
                          keep: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Orthogonal projector [D, D] onto the `rank` directions of text-embedding space with the largest ratio of
    illegal to legal energy (over every token the UNet attends to), and how much of each side's energy it
    holds. Embeddings: [..., D]. The subspace is orthogonal to the directions holding 99.99% of the energy of
    `keep` (the empty prompt: the unconditional branch classifier-free guidance subtracts from every prompt)."""
    ei = illegal_embeddings.reshape(-1, illegal_embeddings.shape[-1]).double()
    el = legal_embeddings.reshape(-1, legal_embeddings.shape[-1]).double()
    d = ei.shape[1]
    basis = torch.eye(d, dtype=ei.dtype)  # coordinates of the space the subspace may use
    kept = 0
    if keep is not None:
        ek = keep.reshape(-1, d).double()
        _, sv, vh = torch.linalg.svd(ek, full_matrices=True)
        # Hold the directions with 99.99% of its energy: its 32 token embeddings span 32 directions, most of them
        # near-empty, and holding all of them would halve the space the subspace is chosen from.
        energy = (sv**2).cumsum(0) / (sv**2).sum()
        kept = int((energy < 1 - 1e-4).sum()) + 1
        basis = vh[kept:].T
    free = basis.shape[1]
    if not 1 <= rank <= free:
        raise ValueError(f"immunise: text_subspace must be between 1 and {free} (text width {d}, {kept} direction(s) "
                         f"held by the empty prompt), got {rank}")
    bi, bl = ei @ basis, el @ basis
    ci, cl = bi.T @ bi / len(bi), bl.T @ bl / len(bl)
    # A ridge keeps the legal covariance invertible when the legal captions span fewer directions.
    chol = torch.linalg.cholesky(cl + 1e-6 * torch.trace(cl) / free * torch.eye(free, dtype=cl.dtype))
    inv = torch.linalg.inv(chol)
    ratios, w = torch.linalg.eigh(inv @ ci @ inv.T)
    directions = basis @ (inv.T @ w.flip(1)[:, :rank])
    q, _ = torch.linalg.qr(directions)
    proj = q @ q.T

    def share(e: torch.Tensor) -> float:
        return float((e @ proj).pow(2).sum() / e.pow(2).sum())

    info = {"rank": rank, "energy_ratios": [float(x) for x in ratios.flip(0)[:rank]], "held_directions": kept,
            "illegal_energy_share": share(ei), "legal_energy_share": share(el)}
    if keep is not None:
        info["kept_energy_share"] = share(keep.reshape(-1, d).double())
    return proj.float(), info


#: Where an immunisation in progress keeps its state (under its output directory); removed once it completes.
CHECKPOINT_DIR = "immunise-checkpoint"
_CHECKPOINT_FORMAT, _CHECKPOINT_VERSION = "freezeasguard-immunise-checkpoint", 1


def _checkpoint_identity(cfg: ImmuniseConfig, seed: int, moving: list[str], rest_names: list[str],
                         origins: list[torch.Tensor]) -> dict[str, Any]:
    """What a checkpoint must match to be continued: the config, the seed, which tensors move and which train,
    and the released values it started from (a checkpoint of another model's immunisation is refused)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in zip(moving, origins):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    identity = {"config": cfg.to_dict(), "seed": seed, "moving": list(moving), "rest": list(rest_names),
                "origins_sha256": h.hexdigest()}
    return json.loads(json.dumps(identity))  # as state.json will hold it (tuples become lists)


def _save_checkpoint(path: Path, step: int, identity: dict[str, Any], tensors: dict[str, list[torch.Tensor]],
                     optimizers: dict[str, torch.optim.Optimizer | None], loop: dict[str, Any]) -> None:
    """The whole loop state after `step` steps, as safetensors + JSON (atomic: a crash mid-write keeps the
    previous checkpoint)."""
    from safetensors.torch import save_file

    from ..training.state import flatten
    from ..utils.files import atomic_directory, atomic_write_json

    flat = {f"{group}.{i}": t.detach().cpu().contiguous() for group, ts in tensors.items() for i, t in enumerate(ts)}
    trees = {}
    for name, opt in optimizers.items():
        if opt is not None:
            t, trees[name] = flatten(opt.state_dict(), f"opt.{name}")
            flat.update(t)
    with atomic_directory(path, overwrite=True) as tmp:
        save_file(flat, str(tmp / "state.safetensors"))
        atomic_write_json(tmp / "state.json", {"format": _CHECKPOINT_FORMAT, "version": _CHECKPOINT_VERSION,
                                               "step": step, "identity": identity, "optimizers": trees, **loop})


def discard_other_checkpoint(output_dir: str | Path, config: ImmuniseConfig) -> bool:
    """Remove an unfinished immunisation's checkpoint in `output_dir` made with another config (True if one
    was): for an owner of the directory whose recipe changed (the bench), where `immunise_frozen` would refuse it."""
    import shutil

    path = Path(output_dir) / CHECKPOINT_DIR
    if not (path / "state.json").is_file():
        return False
    try:
        theirs = json.loads((path / "state.json").read_text()).get("identity", {}).get("config")
    except (OSError, ValueError, AttributeError):
        theirs = None
    if theirs == json.loads(json.dumps(config.to_dict())):
        return False
    shutil.rmtree(path)
    return True


def _load_checkpoint(path: Path, identity: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(state.json, tensors) of the checkpoint at `path`, None if there is none; one of another immunisation
    (config, seed, tensors or starting values) is refused with what differs."""
    from safetensors.torch import load_file

    from ..utils.files import read_json

    if not (path / "state.json").is_file():
        return None
    meta = read_json(path / "state.json", "immunise checkpoint")
    if meta.get("format") != _CHECKPOINT_FORMAT or meta.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"{path}: not a {_CHECKPOINT_FORMAT} v{_CHECKPOINT_VERSION} checkpoint; delete it to start over")
    theirs = meta.get("identity", {})
    differs = sorted(k for k in identity if theirs.get(k) != identity[k])
    if differs:
        raise ValueError(f"{path}: a checkpoint of another immunisation (its {', '.join(differs)} differ from this "
                         "run's); delete it to start over, or use another output directory")
    try:
        tensors = load_file(str(path / "state.safetensors"))
    except Exception as exc:  # a truncated or foreign file: say which, do not guess
        raise ValueError(f"{path / 'state.safetensors'}: unreadable checkpoint ({exc}); delete it to start over") from exc
    return meta, tensors


def immunise_frozen(model: Any, frozen: list[str], illegal: Any, legal: Any, config: ImmuniseConfig | None = None,
                    *, seed: int = 0, output_dir: str | Path | None = None, progress: bool = True,
                    checkpoint_every: int = 25, on_checkpoint: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Optimise the values of the UNet tensors `frozen` in place (see the module doc); returns what it did.

    With `output_dir`, the loop's whole state is checkpointed there every `checkpoint_every` steps
    (CHECKPOINT_DIR) and a rerun with the same model, tensors, config and seed continues from it, bit for bit as
    if never stopped; `on_checkpoint(step)` runs after each checkpoint (a caller may stop there). The checkpoint
    is removed once immunise.json is written."""
    from tqdm.auto import tqdm

    from ..guard import unet_tensors
    from ..utils.files import atomic_write_json
    from .common import encoded, objective_of, seeded_batch, seeded_batches

    cfg = config or ImmuniseConfig()
    tensors = unet_tensors(model.unet)
    unknown = [n for n in frozen if n not in tensors]
    if unknown:
        raise ValueError(f"immunise: {len(unknown)} frozen name(s) are not UNet tensors, e.g. {unknown[:3]}")
    if not frozen:
        raise ValueError("immunise: the frozen set is empty")
    fset = set(frozen)
    names = sorted(fset)
    params = dict(model.unet.named_parameters())
    rest_names = [n for n in params if n not in fset]
    rest = [params[n] for n in rest_names]
    release_rest = [p.detach().clone() for p in rest]
    objective = objective_of(model)
    for p in objective.parameters():
        p.requires_grad_(False)

    def substituted(theta: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """The illegal loss with the UNet's trainable tensors replaced by `theta` (UNet names)."""
        return torch.func.functional_call(objective, {f"unet.{n}": t for n, t in theta.items()}, (batch,))
    ill, leg = encoded(model, illegal), encoded(model, legal)
    subspace_info: dict[str, Any] | None = None
    proj: torch.Tensor | None = None
    moving = names  # the frozen tensors whose values are optimised; the others keep their released values
    selective: list[str] = []  # the K/V among them, confined to the text subspace
    if cfg.text_subspace:
        with torch.no_grad():
            # the states the K/V projections read, in the same space as the cached embeddings (SDXL: both text
            # encoders' concatenated); SDXL's pooled embedding reaches no K/V and has no place in the subspace
            empty = model.encode_prompts([""]).cpu()
        proj, subspace_info = illegal_text_subspace(ill.embeddings, leg.embeddings, cfg.text_subspace,
                                                    keep=empty if cfg.hold_empty_prompt else None)
        width = proj.shape[0]
        selective = [n for n in names if reads_text(n) and params[n].dim() == 2 and params[n].shape[1] == width]
        moving = selective
        if cfg.free_tensors:  # the rest of cross-attention stays as released: token-selective is about the text side
            text_side = set(component_names(model.unet, "freeze-cross-attention"))
            moving = selective + [n for n in names if n not in text_side]
        if not moving:
            # A frozen set without K/V cannot carry token-selective values: release it as it is, and say so
            # (a bench cell of a small random set must not fail for it).
            import warnings

            warnings.warn("immunise: the frozen set holds no cross-attention K/V weights; text_subspace leaves "
                          "every value as released", stacklevel=2)
            subspace_info["note"] = "no cross-attention K/V in the frozen set: nothing immunised"
    values = [params[n] for n in moving]
    origins = [v.detach().clone() for v in values]
    in_subspace = [n in set(selective) for n in moving]
    n = cfg.steps if values else 0
    attacker_data = ill  # the illegal images under the attacker's captions of the current restart
    publisher_words = list(ill.unique_captions) + list(leg.unique_captions)
    legal_batches = seeded_batches(leg, n, cfg.batch_size, seed, STREAM_LEGAL)
    is_free = [proj is not None and not confined for confined in in_subspace]  # free_tensors' image side
    groups = [{"params": [v for v, f in zip(values, is_free) if not f], "lr": cfg.lr},
              {"params": [v for v, f in zip(values, is_free) if f], "lr": cfg.free_lr}]
    defender = torch.optim.Adam([g for g in groups if g["params"]]) if values else None
    attacker: torch.optim.Optimizer | None = None
    legal_user: torch.optim.Optimizer | None = None
    by_user = cfg.legal_at == "user"
    # Two states of the rest share the Parameter objects (so each optimizer keeps its own moments): the
    # attacker's tensors and the legal user's, swapped in through .data.
    attacker_rest = [p.data for p in rest]
    user_rest = [r.clone() for r in release_rest] if by_user else []

    def use(state: list[torch.Tensor]) -> None:
        for p, t in zip(rest, state):
            p.data = t

    history: list[dict[str, Any]] = []
    next_restart = start = 0
    ckpt = Path(output_dir) / CHECKPOINT_DIR if output_dir is not None and checkpoint_every > 0 else None
    identity = _checkpoint_identity(cfg, seed, moving, rest_names, origins) if ckpt is not None else {}
    found = _load_checkpoint(ckpt, identity) if ckpt is not None else None
    if found is not None:
        from ..training.state import unflatten

        meta, saved = found
        start, restart_step, next_restart, history = meta["step"], meta["restart_step"], meta["next_restart"], meta["history"]
        with torch.no_grad():
            for group, ts in (("values", values), ("attacker", attacker_rest), ("user", user_rest)):
                for i, t in enumerate(ts):
                    t.copy_(saved[f"{group}.{i}"])
        # a restart's attacker is a function of (seed, restart step): drawn again, not stored; its moments are
        rate, optimizer_name, horizon = attacker_at_restart(cfg, seed, restart_step)
        if cfg.attack_captions == "random":
            attacker_data = recaptioned(model, ill, random_captions(
                ill.captions, publisher_words, seed, restart_step, cfg.random_caption_words))
        attacker = _attack_optimizer(optimizer_name, rest, rate, cfg)
        legal_user = torch.optim.AdamW(rest, lr=rate) if by_user else None
        for name, opt in (("defender", defender), ("attacker", attacker), ("legal_user", legal_user)):
            if opt is not None and name in meta["optimizers"]:
                opt.load_state_dict(unflatten(meta["optimizers"][name], saved))
    for step in tqdm(range(start, n), desc="immunise frozen values", disable=not progress, dynamic_ncols=True,
                     initial=start, total=n):
        if step == next_restart:
            with torch.no_grad():
                for t, r in zip(attacker_rest + user_rest, release_rest + release_rest):
                    t.copy_(r)
            rate, optimizer_name, horizon = attacker_at_restart(cfg, seed, step)
            if cfg.attack_captions == "random":
                attacker_data = recaptioned(model, ill, random_captions(
                    ill.captions, publisher_words, seed, step, cfg.random_caption_words))
            restart_step, next_restart = step, step + horizon
            attacker = _attack_optimizer(optimizer_name, rest, rate, cfg)
            legal_user = torch.optim.AdamW(rest, lr=rate) if by_user else None
        for p in rest:
            p.requires_grad_(True)
        for v in values:
            v.requires_grad_(False)
        attack_loss = objective(seeded_batch(attacker_data, step, cfg.batch_size, seed, STREAM_ATTACK))
        diverged = not bool(torch.isfinite(attack_loss))
        if not diverged:
            _set_grads(rest, attack_loss)
            if cfg.attack_max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(rest, cfg.attack_max_grad_norm)
            attacker.step()
        attacker.zero_grad(set_to_none=True)
        for p in rest:
            p.requires_grad_(False)
        if diverged or not all(bool(torch.isfinite(p).all()) for p in rest):
            # An attacker that diverged threatens nothing (a real one would lower its rate): it restarts at the
            # next step, and the values take no step from a model that is not one.
            next_restart = step + 1
            history.append({"step": step + 1, "attack_lr": rate, "attack_optimizer": optimizer_name,
                            "restarted": step == restart_step, "diverged": True,
                            "attack_loss": float(attack_loss.detach())})
            continue
        for v in values:
            v.requires_grad_(True)
        defend = seeded_batch(attacker_data, step, cfg.batch_size, seed, STREAM_DEFEND)
        if cfg.unroll_steps:
            ahead = [seeded_batch(attacker_data, step * cfg.unroll_steps + j, cfg.batch_size, seed, STREAM_UNROLL)
                     for j in range(cfg.unroll_steps)]
            # the fused attention kernels have no second derivative: the unrolled graph uses the plain one
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                l_ill = unrolled_loss(substituted, dict(zip(rest_names, rest)), ahead, defend,
                                      rate if cfg.unroll_lr is None else cfg.unroll_lr)
        else:
            l_ill = objective(defend)
        if by_user:
            # Backward of L_illegal before the rest's tensors are swapped under its graph.
            ill_grads = torch.autograd.grad(-l_ill, values)
            # The legal user's step and the defender's legal gradient come from one pass at the user's model.
            use(user_rest)
            for p in rest:
                p.requires_grad_(True)
            l_leg = objective(legal_batches[step])
            grads = torch.autograd.grad(l_leg, values + rest)
            for p, g in zip(rest, grads[len(values):]):
                p.grad = g
            legal_user.step()
            legal_user.zero_grad(set_to_none=True)
            for p in rest:
                p.requires_grad_(False)
            use(attacker_rest)
            for v, gi, gl in zip(values, ill_grads, grads[:len(values)]):
                v.grad = gi + cfg.legal_weight * gl
        else:
            l_leg = objective(legal_batches[step])
            _set_grads(values, -l_ill + cfg.legal_weight * l_leg)
        if all(bool(torch.isfinite(v.grad).all()) for v in values):  # a non-finite step must not reach the values
            defender.step()
        defender.zero_grad(set_to_none=True)
        if proj is not None:
            with torch.no_grad():
                for v, o, confined in zip(values, origins, in_subspace):
                    if confined:
                        v.copy_(o + (v - o) @ proj)
        for free, limit in ((False, cfg.max_change), (True, cfg.free_max_change)):
            pull_into_trust_region_([v for v, f in zip(values, is_free) if f == free],
                                    [o for o, f in zip(origins, is_free) if f == free], limit)
        history.append({"step": step + 1, "attack_lr": rate, "attack_optimizer": optimizer_name,
                        "restarted": step == restart_step, "attack_loss": float(attack_loss.detach()),
                        "illegal_loss": float(l_ill.detach()), "legal_loss": float(l_leg.detach())})
        if ckpt is not None and (step + 1) % checkpoint_every == 0 and step + 1 < n:
            _save_checkpoint(ckpt, step + 1, identity, {"values": values, "attacker": attacker_rest, "user": user_rest},
                             {"defender": defender, "attacker": attacker, "legal_user": legal_user},
                             {"restart_step": restart_step, "next_restart": next_restart, "history": history})
            if on_checkpoint is not None:
                on_checkpoint(step + 1)
    use(attacker_rest)
    with torch.no_grad():
        for p, r in zip(rest, release_rest):
            p.copy_(r)
    for p in params.values():
        p.requires_grad_(False)
    moved = {name: float((v.detach() - o).norm() / (o.norm() + 1e-12)) for name, v, o in zip(moving, values, origins)}
    change = {name: moved.get(name, 0.0) for name in names}
    info = {"immunise": cfg.to_dict(), "immunised_tensors": len(names), "moved_tensors": len(moving),
            "mean_relative_change": sum(change.values()) / len(change), "text_subspace": subspace_info,
            "first": history[0] if history else None, "last": history[-1] if history else None}
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(output_dir) / "immunise.json", {**info, "history": history, "relative_change": change})
    if ckpt is not None and ckpt.exists():
        import shutil

        shutil.rmtree(ckpt, ignore_errors=True)  # done: the release and immunise.json are the record
    return info


#: What `immunised_release(add=...)` freezes beside the guard's set. Token-selective values live in the
#: cross-attention K/V weights, so every one must be frozen ("kv"); "xattn" also freezes the cross-attention
#: queries and outputs, the paths a relearning user could re-route around immunised keys and values (measured on
#: the embedded figures scenario: docs/results.md); "none" immunises the guard's own set as it is.
IMMUNISE_ADDS: tuple[str, ...] = ("none", "kv", "xattn")
ADD_COMPONENT = {"kv": "freeze-kv", "xattn": "freeze-cross-attention"}  # the protection each adds


def added_tensors(unet: Any, add: str) -> set[str]:
    """The UNet tensors `add` puts in the frozen set (see IMMUNISE_ADDS)."""
    if add not in IMMUNISE_ADDS:
        raise ValueError(f"add must be one of {IMMUNISE_ADDS}, got {add!r}")
    return set(component_names(unet, ADD_COMPONENT[add])) if add != "none" else set()


def immunised_release(model: Any, guard: Any, illegal: Any, legal: Any, config: ImmuniseConfig | None = None,
                      *, add: str = "xattn", seed: int = 0, output_dir: str | Path | None = None,
                      progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """The publisher's release with immunised frozen values: the guard's set plus `add`, whose values are
    optimised in place in `model` (`immunise_frozen`) so that relearning the illegal domain through the
    trainable rest fails while legal fine-tuning works. Returns the new guard (its fingerprint is of the new
    values: release `model` with it, never the old one) and what the immunisation did.

    `guard` must belong to `model` (its fingerprint and frozen values are checked first), so a guard is never
    re-fingerprinted onto a model it was not made for."""
    from ..guard import Guard

    guard.check_values(model.unet)
    extra = added_tensors(model.unet, add)
    frozen = sorted(set(guard.frozen) | extra)
    info = immunise_frozen(model, frozen, illegal, legal, config, seed=seed, output_dir=output_dir, progress=progress)
    provenance = {**guard.provenance, "immunised": True, "immunise": info["immunise"]}
    if add == "kv":  # the key recorded since the first of these releases
        provenance["added_cross_attention_kv"] = len(set(frozen) - set(guard.frozen))
    elif add != "none":
        provenance[f"added_{add}"] = len(set(frozen) - set(guard.frozen))
    # the release's name in the composite grammar: the guard's method, the component added, then immunise
    method = "+".join([guard.method] + ([ADD_COMPONENT[add]] if add != "none" else []) + ["immunise"])
    new = dataclasses.replace(Guard.from_names(model.unet, frozen, method=method, scores=guard.scores,
                                               provenance=provenance),
                              allow_text_encoder=guard.allow_text_encoder, text_encoders=guard.text_encoders)
    return new, info


@register("immunise", ImmuniseConfig)
def immunise(ctx: ReleaseContext, config: ImmuniseConfig, prior: Release | None) -> Release:
    """The frozen set of the stages before it, released with immunised values (hostile to relearning the
    illegal domain through the trainable rest)."""
    if prior is None or prior.guard is None:
        raise ValueError("immunise: the stages before it released no guard (use e.g. guard+immunise)")
    guard, info = immunised_release(prior.model, prior.guard, ctx.illegal, ctx.legal, config, add="none",
                                    seed=ctx.seed, output_dir=ctx.output_dir)
    return Release(prior.model, guard, {**prior.info, **info})
