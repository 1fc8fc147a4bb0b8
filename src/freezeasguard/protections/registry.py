"""The protection registry: a protection is a name, its own config dataclass and a function.

A protection takes the base model and the publisher's data and *releases* something: a model (possibly edited,
as by UCE or IMMA) and a guard (possibly none). The benchmark then lets users fine-tune the release and
measures what they get. Adding one is a decorated function with its config class:

    @dataclass
    class MyConfig:
        strength: float = 1.0

    @register("my-protection", MyConfig, needs_ratio=True)
    def my_protection(ctx: ReleaseContext, config: MyConfig) -> Release: ...

Protections compose left to right with one grammar, `A+B+C`: A releases first, and each later stage works on
the release before it (see `composites`). A stage that takes no prior release (`accepts_prior=False`: the model
edits UCE and IMMA) may stand only first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..configs import RATIO_BY_DEFAULT, JsonConfig, check_ratio_by, from_partial


@dataclass
class NoConfig(JsonConfig):
    """A protection without settings of its own."""


@dataclass
class ReleaseContext:
    """What every protection gets: the base, the publisher's data, the ratio and its unit, a seed."""

    model: Any  # DiffusionModel: the base; a protection may edit it in place and release it
    illegal: Any  # the publisher's illegal dataset
    legal: Any  # the publisher's legal dataset
    ratio: float = 0.0
    seed: int = 0
    output_dir: Any = None
    ratio_by: str = RATIO_BY_DEFAULT  # what the ratio counts: "params" (a parameter budget) or "count" (tensors)
    # What UCE edits, from the scenario: prompts whose tokens are re-mapped, their guides, prompts kept.
    prompts: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_ratio_by(self.ratio_by, "ReleaseContext.ratio_by")


@dataclass
class Release:
    model: Any  # DiffusionModel
    guard: Any  # Guard | None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Protection:
    name: str
    config_cls: type
    fn: Callable[..., Release]  # (ReleaseContext, config, prior: Release | None) -> Release
    needs_ratio: bool
    description: str
    accepts_prior: bool  # may follow another stage in a composite

    def config(self, data: Any = None) -> Any:
        """This protection's config from None (defaults), an instance, or JSON-like data (strictly checked)."""
        if data is None:
            return self.config_cls()
        if isinstance(data, self.config_cls):
            return data
        if isinstance(data, dict):
            return from_partial(self.config_cls, data)
        raise TypeError(f"protection {self.name!r}: config must be a {self.config_cls.__name__} or a dict, "
                        f"got {type(data).__name__}")


PROTECTIONS: dict[str, Protection] = {}


def register(name: str, config_cls: type = NoConfig, *, needs_ratio: bool = False, accepts_prior: bool = True,
             description: str | None = None) -> Callable[[Callable[..., Release]], Callable[..., Release]]:
    if "+" in name or "@" in name:
        raise ValueError(f"protection name {name!r}: '+' composes protections and '@' sets a ratio")
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"protection {name!r}: its config must be a dataclass, got {config_cls!r}")

    def wrap(fn: Callable[..., Release]) -> Callable[..., Release]:
        if name in PROTECTIONS:
            raise ValueError(f"protection {name!r} is already registered")
        text = description or (fn.__doc__ or "").strip().split("\n")[0]
        PROTECTIONS[name] = Protection(name, config_cls, fn, needs_ratio, text, accepts_prior)
        return fn

    return wrap


def stages(name: str) -> list[str]:
    """'guard+freeze-cross-attention+immunise' -> its stages, each a registered protection (checked)."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in PROTECTIONS]
    if not name or unknown:
        raise ValueError(f"unknown protection {name!r}" + (f" (stage(s) {', '.join(unknown)})" if unknown else "")
                         + f"; registered: {', '.join(sorted(PROTECTIONS))}")
    for p in parts[1:]:
        if not PROTECTIONS[p].accepts_prior:
            raise ValueError(f"protection {name!r}: {p} edits the base model and must come first")
    if parts[0] in ("immunise", "nullspace"):
        raise ValueError(f"protection {name!r}: {parts[0]} needs a frozen set before it (e.g. guard+{parts[0]})")
    if len(parts) > 1 and parts[0] == "none":
        raise ValueError(f"protection {name!r}: 'none' releases nothing to build on")
    return parts


def needs_ratio(name: str) -> bool:
    return any(PROTECTIONS[p].needs_ratio for p in stages(name))


def describe(name: str) -> str:
    parts = stages(name)
    if len(parts) == 1:
        return PROTECTIONS[name].description
    return "Composite, left to right: " + "; then ".join(f"{p} ({PROTECTIONS[p].description.rstrip('.')})"
                                                          for p in parts) + "."


def configs_for(name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The typed config of every stage of `name`, from `options` (stage name -> config or dict; others take
    their defaults)."""
    options = options or {}
    return {p: PROTECTIONS[p].config(options.get(p)) for p in stages(name)}


def config_dict(config: Any) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)


def protect(name: str, ctx: ReleaseContext, options: dict[str, Any] | None = None) -> Release:
    """Release with `name` (one protection or a composite): each stage in turn, each on the release before it."""
    parts = stages(name)
    cfgs = configs_for(name, options)
    release: Release | None = None
    for p in parts:
        release = PROTECTIONS[p].fn(ctx if release is None else dataclasses.replace(ctx, model=release.model),
                                    cfgs[p], release)
    assert release is not None
    if release.guard is not None:
        if len(parts) > 1:
            release.guard = dataclasses.replace(release.guard, method=name)
        release.guard = release.guard.with_text_encoders(release.model)
    return release
