"""Protection methods behind one interface: the learned guard and every baseline it is compared with.

A method takes the base model and the publisher's data and *releases* something: a model (possibly edited,
as by UCE or IMMA) and a guard (possibly none). The benchmark then lets users fine-tune the release and
measures what they get. Adding a method is one decorated function:

    @register("my-method", needs_ratio=True)
    def my_method(ctx: MethodContext) -> Release: ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .guard import Guard, unet_tensors
from .model import DiffusionModel

if TYPE_CHECKING:
    from .immunise import ImmuniseConfig
    from .learn import LearnConfig


@dataclass
class MethodOptions:
    """Settings of the methods that need more than a ratio and a seed; each method reads its own."""

    learn: LearnConfig | None = None  # guard, guard+uce, importance-change's warm start; None: LearnConfig()
    uce_edit: list[str] = field(default_factory=list)  # prompts whose tokens UCE re-maps ...
    uce_guide: list[str] = field(default_factory=list)  # ... onto these (one per edited prompt)
    uce_preserve: list[str] = field(default_factory=list)  # prompts whose projections UCE keeps
    uce_lambda: float = 1.0
    imma_steps: int = 100
    imma_lr: float = 1e-4
    imma_lora_lr: float = 1e-3
    immunise: ImmuniseConfig | None = None  # the "+immunise" methods; None: ImmuniseConfig()

    def immunise_config(self) -> ImmuniseConfig:
        from .immunise import ImmuniseConfig

        return self.immunise if self.immunise is not None else ImmuniseConfig()

    def learn_config(self) -> LearnConfig:
        from .learn import LearnConfig

        return self.learn if self.learn is not None else LearnConfig()


@dataclass
class MethodContext:
    model: DiffusionModel  # the base; a method may edit it in place and release it
    illegal: Any  # publisher's illegal dataset
    legal: Any  # publisher's legal dataset
    ratio: float
    seed: int = 0
    options: MethodOptions = field(default_factory=MethodOptions)
    output_dir: Any = None
    by: str = "count"  # what the ratio counts: "count" (tensors) or "params" (a parameter budget)

    def __post_init__(self) -> None:
        if not isinstance(self.options, MethodOptions):
            raise TypeError(f"MethodContext.options must be a MethodOptions, got {type(self.options).__name__}")


@dataclass
class Release:
    model: DiffusionModel
    guard: Guard | None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodSpec:
    name: str
    fn: Callable[[MethodContext], Release]
    needs_ratio: bool
    description: str
    uses: tuple[str, ...] = ()  # the method's own settings (MethodOptions / bench profile sections) it reads


METHODS: dict[str, MethodSpec] = {}


def register(name: str, *, needs_ratio: bool = False,
             uses: tuple[str, ...] = ()) -> Callable[[Callable[[MethodContext], Release]], Callable[[MethodContext], Release]]:
    def wrap(fn: Callable[[MethodContext], Release]) -> Callable[[MethodContext], Release]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = MethodSpec(name, fn, needs_ratio, (fn.__doc__ or "").strip().split("\n")[0], tuple(uses))
        return fn

    return wrap


def release(name: str, ctx: MethodContext) -> Release:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name].fn(ctx)


# ---------------------------------------------------------------------------- helpers
def _objective(model: DiffusionModel) -> Any:
    from .objective import DenoisingObjective

    return DenoisingObjective(model)


def _encoded(model: DiffusionModel, data: Any) -> Any:
    from .objective import EncodedDataset

    with torch.no_grad():
        return EncodedDataset(model, data)


def _batches(data: Any, n_batches: int, batch_size: int, seed: int) -> list[dict[str, Any]]:
    from .seeding import derive_seed

    out = []
    for b in range(n_batches):
        examples = []
        for i in range(batch_size):
            s = derive_seed(seed, 77, b, i)
            ex = dict(data.example(s % len(data), s))
            ex["seeds"] = s
            examples.append(ex)
        out.append(data.collate(examples))
    return out


def gradient_sq_norms(model: DiffusionModel, data: Any, *, n_batches: int = 4, batch_size: int = 16,
                      seed: int = 0) -> dict[str, float]:
    """Per UNet tensor: the squared norm of the denoising-loss gradient on `data`, per parameter element."""
    objective = _objective(model)
    enc = _encoded(model, data)
    params = unet_tensors(model.unet)
    for p in objective.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    for batch in _batches(enc, n_batches, batch_size, seed):
        (objective(batch) / n_batches).backward()
    out = {n: float(p.grad.double().pow(2).sum() / p.numel()) if p.grad is not None else 0.0 for n, p in params.items()}
    for p in params.values():
        p.grad = None
        p.requires_grad_(False)
    return out


def warm_start(model: DiffusionModel, ctx: MethodContext) -> dict[str, torch.Tensor]:
    """The mixed fine-tune of the guard learner's warm start, returned as UNet tensors (the model is untouched)."""
    import copy

    from .learn import train_mixed

    tuned = copy.deepcopy(model)
    objective = _objective(tuned)
    params = {f"unet.{n}": p for n, p in tuned.unet.named_parameters()}
    warm_cfg = dataclasses.replace(ctx.options.learn_config().warm_start, seed=ctx.seed)
    train_mixed(objective, _encoded(tuned, ctx.illegal), _encoded(tuned, ctx.legal), params, warm_cfg,
                desc="warm start (importance)")
    return {n: p.detach().clone() for n, p in unet_tensors(tuned.unet).items()}


# ---------------------------------------------------------------------------- methods
@register("none")
def _none(ctx: MethodContext) -> Release:
    """No protection: users fine-tune the base freely (full fine-tuning)."""
    return Release(ctx.model, None)


@register("random", needs_ratio=True)
def _random(ctx: MethodContext) -> Release:
    """Random freezing at the same ratio (seeded)."""
    return Release(ctx.model, Guard.random(ctx.model.unet, ctx.ratio, seed=ctx.seed, by=ctx.by))


@register("importance-change", needs_ratio=True, uses=("learn",))
def _importance_change(ctx: MethodContext) -> Release:
    """One-shot: freeze the tensors that moved most (relative change) in the mixed warm-start fine-tune."""
    base = {n: t.detach() for n, t in unet_tensors(ctx.model.unet).items()}
    tuned = warm_start(ctx.model, ctx)
    scores = {n: float((tuned[n] - t).double().norm() / (t.double().norm() + 1e-12)) for n, t in base.items()}
    return Release(ctx.model, Guard.from_scores(ctx.model.unet, scores, ctx.ratio, by=ctx.by, method="importance-change"))


@register("importance-grad", needs_ratio=True)
def _importance_grad(ctx: MethodContext) -> Release:
    """One-shot: freeze the tensors with the largest illegal-domain gradient per parameter."""
    scores = gradient_sq_norms(ctx.model, ctx.illegal, seed=ctx.seed)
    return Release(ctx.model, Guard.from_scores(ctx.model.unet, scores, ctx.ratio, by=ctx.by, method="importance-grad"))


@register("importance-ratio", needs_ratio=True)
def _importance_ratio(ctx: MethodContext) -> Release:
    """One-shot: freeze the tensors with the largest ratio of illegal to legal gradient norms."""
    ill = gradient_sq_norms(ctx.model, ctx.illegal, seed=ctx.seed)
    leg = gradient_sq_norms(ctx.model, ctx.legal, seed=ctx.seed + 1)
    scores = {n: (ill[n] / (leg[n] + 1e-30)) ** 0.5 for n in ill}
    return Release(ctx.model, Guard.from_scores(ctx.model.unet, scores, ctx.ratio, by=ctx.by, method="importance-ratio"))


@register("guard", needs_ratio=True, uses=("learn",))
def _guard(ctx: MethodContext) -> Release:
    """FreezeAsGuard: the learned guard (bilevel mask learning)."""
    import copy

    from .learn import learn_guard

    cfg = dataclasses.replace(ctx.options.learn_config(), ratio=ctx.ratio, ratio_by=ctx.by, seed=ctx.seed)
    guard = learn_guard(copy.deepcopy(ctx.model), ctx.illegal, ctx.legal, cfg, output_dir=ctx.output_dir)
    return Release(ctx.model, guard)


@register("uce")
def _uce(ctx: MethodContext) -> Release:
    """UCE: closed-form edit of the cross-attention key/value projections (illegal concepts -> a guide)."""
    o = ctx.options
    info = uce_edit(ctx.model, o.uce_edit, o.uce_guide, o.uce_preserve, lam=o.uce_lambda)
    return Release(ctx.model, None, info)


@register("guard+uce", needs_ratio=True, uses=("learn",))
def _guard_uce(ctx: MethodContext) -> Release:
    """The authors' pipeline: unlearn with UCE first, then learn a guard on the edited model."""
    edited = _uce(ctx)
    guarded = _guard(dataclasses.replace(ctx, model=edited.model))
    return Release(edited.model, guarded.guard, edited.info)


@register("imma", uses=("imma_steps",))
def _imma(ctx: MethodContext) -> Release:
    """IMMA: attention weights take gradient-ascent steps against a LoRA that keeps re-learning the illegal data."""
    o = ctx.options
    info = imma_immunize(ctx.model, ctx.illegal, steps=o.imma_steps, seed=ctx.seed, lr=o.imma_lr,
                         lora_lr=o.imma_lora_lr)
    return Release(ctx.model, None, info)


# The paper's component ablations: whole kinds of tensor frozen at once, whatever the ratio.
COMPONENTS = {
    "freeze-cross-attention": ("every cross-attention projection (attn2 to_q/to_k/to_v/to_out)",
                               lambda n: ".attn2.to_" in n),
    "freeze-resnets": ("every resnet block", lambda n: ".resnets." in n),
    "freeze-time-embedding": ("the time embedding", lambda n: n.startswith("time_embedding.")),
}


def component_names(unet: Any, kind: str) -> list[str]:
    _, match = COMPONENTS[kind]
    names = [n for n in unet_tensors(unet) if match(n)]
    if not names:
        raise ValueError(f"{kind}: this UNet has no such tensors")
    return names


def _register_component(kind: str) -> None:
    description, _ = COMPONENTS[kind]

    def method(ctx: MethodContext) -> Release:
        return Release(ctx.model, Guard.from_names(ctx.model.unet, component_names(ctx.model.unet, kind), method=kind))

    method.__doc__ = f"Component freezing: {description}."
    register(kind)(method)


for _kind in COMPONENTS:
    _register_component(_kind)


# Issue 11's lever 5: the frozen set of a method, released with immunised values (see `immunise`).
IMMUNISED = ("guard", "random", "freeze-cross-attention")


def _register_immunised(base: str, *, extra: str = "none") -> None:
    spec = METHODS[base]
    name = f"{base}+{extra}+immunise" if extra != "none" else f"{base}+immunise"

    def method(ctx: MethodContext) -> Release:
        from .immunise import immunised_release

        chosen = spec.fn(ctx)
        if chosen.guard is None:
            raise ValueError(f"{name}: {base} released no guard")
        guard, info = immunised_release(chosen.model, chosen.guard, ctx.illegal, ctx.legal,
                                        ctx.options.immunise_config(), add=extra, seed=ctx.seed,
                                        output_dir=ctx.output_dir)
        return Release(chosen.model, guard, {**chosen.info, **info})

    if extra == "kv":
        method.__doc__ = (f"{base}'s frozen set plus every cross-attention key/value weight, released with immunised "
                          "values (token-selective immunising needs every K/V frozen; the set exceeds the ratio by "
                          "the K/V the base left out).")
    elif extra == "xattn":
        method.__doc__ = (f"{base}'s frozen set plus every cross-attention projection, released with immunised "
                          "values (queries and outputs frozen too, so a relearning user cannot re-route around the "
                          "immunised keys and values; the set exceeds the ratio by what the base left out).")
    else:
        method.__doc__ = f"{base}'s frozen set, released with immunised values (lever 5: hostile to relearning the illegal domain)."
    register(name, needs_ratio=spec.needs_ratio, uses=spec.uses + ("immunise",))(method)


for _base in IMMUNISED:
    _register_immunised(_base)
for _extra in ("kv", "xattn"):
    _register_immunised("guard", extra=_extra)


@register("immunised-xattn+guard", needs_ratio=True, uses=("learn", "immunise"))
def _immunised_xattn_guard(ctx: MethodContext) -> Release:
    """Every cross-attention projection frozen with immunised values first, then a guard learned on that
    release for the rest of the ratio (the mask adds only what the immunised set still lets through)."""
    import copy

    from .learn import learn_guard

    first = METHODS["freeze-cross-attention+immunise"].fn(ctx)
    if first.guard is None:
        raise ValueError("immunised-xattn+guard: freeze-cross-attention+immunise released no guard")
    cfg = dataclasses.replace(ctx.options.learn_config(), ratio=ctx.ratio, ratio_by=ctx.by, seed=ctx.seed)
    out = None if ctx.output_dir is None else Path(ctx.output_dir) / "learn"
    learned = learn_guard(copy.deepcopy(first.model), ctx.illegal, ctx.legal, cfg, output_dir=out,
                          always_frozen=first.guard.frozen)
    guard = dataclasses.replace(learned, method="immunised-xattn+guard",
                                provenance={**learned.provenance, "immunised": True,
                                            "immunise": first.info.get("immunise")})
    return Release(first.model, guard, first.info)


# ---------------------------------------------------------------------------- UCE
def uce_closed_form(W: torch.Tensor, edit: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor,
                    lam: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """argmin_W' sum_i |W' c_i - W c*_i|^2 + lam sum_j |W' c_j - W c_j|^2 + eps |W' - W|^2.

    `edit` and `guide` are [n, d] rows c_i and c*_i, `preserve` [m, d] rows c_j; W is [out, d]. Solution:
    W' = (W G^T E + lam W P^T P + eps W)(E^T E + lam P^T P + eps I)^-1 with E, G, P the row matrices.
    """
    W64, E, G, P = W.double(), edit.double(), guide.double(), preserve.double()
    d = W.shape[1]
    lhs = E.T @ E + lam * P.T @ P + eps * torch.eye(d, dtype=torch.float64)
    rhs = W64 @ G.T @ E + lam * W64 @ P.T @ P + eps * W64
    return torch.linalg.solve(lhs, rhs.T).T.to(W.dtype)


def _hidden(model: DiffusionModel, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [n, L] and text-encoder hidden states [n, L, d] of the prompts, padded as the UNet sees them."""
    with torch.no_grad():
        ids = model.tokenize(list(prompts))
        hidden = model.text_encoder(ids.to(model.text_encoder.device))[0].cpu()
    return ids.cpu(), hidden


def _first(row: torch.Tensor, token: int) -> int:
    hits = (row == token).nonzero()
    return int(hits[0]) if len(hits) else len(row)


def _aligned_pairs(ids_e: torch.Tensor, ids_g: torch.Tensor, eos: int) -> list[tuple[int, int]]:
    """Position pairs (edit, guide) of two padded captions that differ in a middle span ("a police officer" vs
    "a person"): the shared suffix, the end token and the padding after it are paired counting from the end
    token, the differing span maps onto the guide's span (its last token where the guide's is shorter). The
    shared prefix is left out: causal attention makes it identical in both. Every position the UNet attends to
    after the prefix is paired, so the edited caption is seen as the guide."""
    end_e, end_g = _first(ids_e, eos), _first(ids_g, eos)
    p = 1
    while p < min(end_e, end_g) and ids_e[p] == ids_g[p]:
        p += 1
    s = 0
    while s < min(end_e, end_g) - p and ids_e[end_e - 1 - s] == ids_g[end_g - 1 - s]:
        s += 1
    pairs = []
    mid_g = max(end_g - s - p, 0)
    for i in range(p, end_e - s):  # the differing span
        pairs.append((i, p + min(i - p, mid_g - 1) if mid_g else p - 1))
    for k in range(-s, len(ids_e) - max(end_e, end_g)):  # shared suffix, end token, padding
        pairs.append((end_e + k, end_g + k))
    return pairs


def _token_rows(model: DiffusionModel, prompts: Sequence[str]) -> torch.Tensor:
    """Hidden states of every position (padding included: the UNet attends to it), stacked [n, d]; the start
    token, the same in every caption and where attention sinks, once."""
    if not prompts:
        return torch.zeros(0, model.text_encoder.config.hidden_size)
    _, hidden = _hidden(model, prompts)
    return torch.cat([hidden[:1, 0], hidden[:, 1:].reshape(-1, hidden.shape[-1])])


def uce_edit(model: DiffusionModel, edit_prompts: Sequence[str], guide_prompts: Sequence[str],
             preserve_prompts: Sequence[str], *, lam: float = 1.0) -> dict[str, Any]:
    """Edit every cross-attention to_k / to_v of the UNet in place so edit prompts' tokens project like the
    guide prompts' tokens, while preserve prompts' tokens keep their projections."""
    if len(edit_prompts) != len(guide_prompts):
        raise ValueError("UCE needs one guide prompt per edited prompt")
    width = model.text_encoder.config.hidden_size
    E, G = torch.zeros(0, width), torch.zeros(0, width)
    if edit_prompts:
        ids_e, hid_e = _hidden(model, edit_prompts)
        ids_g, hid_g = _hidden(model, guide_prompts)
        eos = model.tokenizer.eos_token_id
        pairs = [(n, i, j) for n in range(len(ids_e)) for i, j in _aligned_pairs(ids_e[n], ids_g[n], eos)]
        E = torch.stack([hid_e[n, i] for n, i, _ in pairs])
        G = torch.stack([hid_g[n, j] for n, _, j in pairs])
    P = _token_rows(model, preserve_prompts)
    edited = []
    with torch.no_grad():
        for name, module in model.unet.named_modules():
            if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
                module.weight.copy_(uce_closed_form(module.weight, E, G, P, lam))
                edited.append(f"{name}.weight")
    return {"uce_edited_tensors": edited, "edit_rows": len(E), "preserve_rows": len(P), "lambda": lam}


# ---------------------------------------------------------------------------- IMMA
def strip_adapters(unet: Any) -> Any:
    """A plain UNet of the same config holding the (possibly edited) base weights, without peft wrappers."""
    state = {n: t.detach().clone() for n, t in unet_tensors(unet).items()}
    buffers = {n: b for n, b in unet.named_buffers()}
    plain = type(unet).from_config(unet.config)
    missing, unexpected = plain.load_state_dict({**buffers, **state}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"could not strip adapters: missing {missing[:3]}, unexpected {unexpected[:3]}")
    plain.to(next(unet.parameters()).device).eval().requires_grad_(False)
    return plain


def imma_immunize(model: DiffusionModel, illegal: Any, *, steps: int = 100, seed: int = 0, lr: float = 1e-4,
                  lora_lr: float = 1e-3, rank: int = 4, batch_size: int = 16) -> dict[str, Any]:
    """Alternate: a LoRA adapter descends the illegal loss; the attention projections (the weights it adapts)
    ascend the loss of the adapted model. The adapter is then removed; the immunised weights are released."""
    from peft import LoraConfig

    from .finetuning import DEFAULT_LORA_TARGETS
    from .seeding import STREAM_ADAPTER, derive_seed, seeded_global_rng

    enc = _encoded(model, illegal)
    objective = _objective(model)
    for p in objective.parameters():
        p.requires_grad_(False)
    with seeded_global_rng(derive_seed(seed, STREAM_ADAPTER)):  # peft initialises lora_A from the global RNG
        model.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                          target_modules=list(DEFAULT_LORA_TARGETS)), adapter_name="imma")
    lora = [p for n, p in model.unet.named_parameters() if ".lora_" in n]
    theta = [p for n, p in model.unet.named_parameters() if ".base_layer." in n]
    for p in lora + theta:
        p.requires_grad_(True)
    opt_lora = torch.optim.AdamW(lora, lr=lora_lr)
    opt_theta = torch.optim.Adam(theta, lr=lr, maximize=True)
    losses = []


    def step_on(params: list[torch.Tensor], opt: torch.optim.Optimizer, batch: dict[str, Any]) -> float:
        # gradient of the loss for this group only; the other group's grads stay untouched
        loss = objective(batch)
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for batch in _batches(enc, steps, batch_size, seed):
        step_on(lora, opt_lora, batch)  # the adapter re-learns the illegal data
        losses.append(step_on(theta, opt_theta, batch))  # the weights ascend the adapted model's loss
    model.unet = strip_adapters(model.unet)
    return {"imma_steps": steps, "imma_loss_first": losses[0] if losses else None,
            "imma_loss_last": losses[-1] if losses else None, "imma_immunized_tensors": len(theta)}
