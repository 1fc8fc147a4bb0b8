"""Bench profiles: what a bench run computes (scenarios, protections, ratios, seeds, the users' budgets and
each protection's config), as data. A profile is one of `PROFILES` or a JSON file (`bench --config`), checked
in full before any work starts."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..configs import RATIO_BY_DEFAULT, check_ratio_by, strict_from_dict
from .evaluate import SamplingConfig
from .relearn import RelearnConfig

FORMS = ("relearn", "scratch")
SCENARIOS = ("figures", "artstyle")


@dataclass
class BenchProfile:
    name: str
    scenarios: list[str]  # "figures", "artstyle" (relearn form); "figures-scratch", "artstyle-scratch"
    methods: list[str]  # a protection (or composite A+B), or "NAME@RATIO" for that protection at that ratio only
    ratios: list[float]  # the frontier: every protection that takes a ratio runs at each
    seeds: list[int]
    steps: int = 400  # the illegal user's attack budget
    legal_steps: int = 800  # the legal user's budget: where full fine-tuning has plateaued on the legal domains
    batch_size: int = 32
    lr: float = 1e-4
    n_samples: int = 200
    curve_cells: list[str] = field(default_factory=lambda: ["none", "random@0.3", "guard@0.3"])
    curve_steps: list[int] = field(default_factory=lambda: [25, 50, 100, 200, 400])  # illegal user
    legal_curve_steps: list[int] = field(default_factory=lambda: [200, 400])  # legal user, below legal_steps
    curve_samples: int = 100  # samples per domain at a curve point other than the budgets
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    relearn: RelearnConfig = field(default_factory=RelearnConfig)
    # Each protection stage's config, by stage name (`protections.PROTECTIONS[name].config_cls`, or its fields
    # as a dict); a stage not named here runs with its defaults. A cell records the configs of its stages, so
    # a change reruns exactly the cells that use that stage.
    options: dict[str, Any] = field(default_factory=dict)
    # The attacks every protection (but full fine-tuning's own reference, which runs them all) is measured
    # against: names in `freezeasguard.attacks.ATTACKS`. "default" is the illegal user above (the main cells);
    # each other attack adds a cell per protection and ratio, and one of full fine-tuning under that attack.
    attacks: list[str] = field(default_factory=lambda: ["default"])
    # The publisher's legal-far images repeated this many times in its legal sample (the share of legal-far
    # against legal-near in what a protection learns from; 1: as the scenario splits them).
    publisher_legal_far_repeat: int = 1
    keep_images: int = 8  # first samples per domain kept beside each cell (sample grids)
    ratio_by: str = RATIO_BY_DEFAULT  # every method freezes the same share of parameters, so the comparison is fair
    # A setting whose validity checks fail (known after its base cell and full fine-tuning) is void: its other
    # cells would be left out of every figure, so they are not computed; the report lists them as skipped.
    skip_void: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = strict_from_dict(SamplingConfig, self.sampling)
        if isinstance(self.relearn, dict):
            self.relearn = strict_from_dict(RelearnConfig, self.relearn)

    def typed_options(self) -> dict[str, Any]:
        """`options` with every entry as its stage's config dataclass (unknown stages and fields refused)."""
        from ..protections import PROTECTIONS

        out = {}
        for name, cfg in self.options.items():
            if name not in PROTECTIONS:
                raise ValueError(f"options: {name!r} is not a protection; registered: {', '.join(sorted(PROTECTIONS))}")
            try:
                out[name] = PROTECTIONS[name].config(cfg)
            except (TypeError, ValueError) as e:
                raise ValueError(f"options[{name!r}]: {e}") from None
        return out

    def to_dict(self) -> dict[str, Any]:
        from ..protections import config_dict

        d = asdict(replace(self, options={}))
        d["options"] = {k: config_dict(v) for k, v in self.typed_options().items()}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchProfile:
        return strict_from_dict(cls, data)

    @classmethod
    def load(cls, path: str | Path) -> BenchProfile:
        """A profile from a JSON file, validated in full (an unknown field is an error, naming the file)."""
        from ..utils.files import read_json

        data = read_json(path, "bench profile")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a bench profile is a JSON object")
        try:
            profile = cls.from_dict(data)
            profile.validate()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None
        return profile

    def validate(self) -> None:
        from ..protections import stages

        for spec in self.methods:
            stages(parse_cell(spec)[0])
        for spec in self.curve_cells:
            try:
                stages(parse_cell(spec)[0])
            except ValueError as e:
                raise ValueError(f"curve cell {spec!r}: {e}") from None
        planned_cells(self)  # refuses "NAME@RATIO" for a protection that takes no ratio
        for sc in self.scenarios:
            scenario_form(sc)
        check_ratio_by(self.ratio_by)
        for name in ("steps", "legal_steps", "batch_size", "n_samples", "curve_samples", "publisher_legal_far_repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        for r in self.ratios:
            if not 0.0 < r < 1.0:
                raise ValueError(f"ratios must be in (0, 1), got {r}")
        if not self.seeds:
            raise ValueError("seeds: at least one")
        from ..attacks import ATTACKS

        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(f"attacks: unknown {unknown}; registered: {', '.join(ATTACKS)}")
        if "default" not in self.attacks:
            raise ValueError("attacks: the battery is measured beside the default attacker; list 'default'")
        self.typed_options()


def _battery() -> tuple[str, ...]:
    """The battery and, beside it, the reference attacks outside the publisher's path."""
    from ..attacks import BATTERY, REFERENCES

    return BATTERY + REFERENCES


def default_options() -> dict[str, Any]:
    """The profiles' protection configs: UCE at the relearn recipe's lambda (the scenarios' own unlearning),
    everything else at its defaults."""
    return {"uce": {"lam": RelearnConfig().uce_lambda}}


ALL_METHODS = ["none", "random", "importance-change", "importance-grad", "importance-ratio", "uce", "imma",
               "freeze-cross-attention", "freeze-resnets", "freeze-time-embedding", "guard", "uce+guard"]
FRONTIER_METHODS = ["none", "random", "importance-ratio", "freeze-cross-attention", "freeze-resnets",
                    "freeze-time-embedding", "guard"]
# The project's strongest release so far (by the default attacker's mitigation and the battery's worst case,
# docs/results.md): every cross-attention projection frozen, with token-selective immunised values.
STRONGEST_RELEASE = "freeze-cross-attention+immunise"

PROFILES = {
    # quick: the figures relearn scenario sized for a 2-core CPU's 3 hours (each setting: the taught base and its
    # release, then up to 12 cells of 400 illegal + 800 legal user steps): the frontier at 0.3 and 0.5 for the
    # guard, random and importance freezing, two component baselines, all cross-attention released with
    # immunised values (token-selective by default, ImmuniseConfig), and the learned set at 0.3 plus every
    # cross-attention projection released that way; curves for full fine-tuning, random freezing, the guard at 0.3 and the
    # immunised releases. A void setting stops after its validity cells (skip_void). 200 samples per domain at
    # the budgets, as docs/benchmark.md asks. Legal users run 800 steps: on figures seed 0, full fine-tuning's
    # legal-near rate was 79 / 90 / 94% at 400 / 800 / 1600 steps and legal-far 96 / 92 / 97%. artstyle is valid
    # only on its four-times wider base (11-17 min a cell at two threads), where these cells would add about 4 h:
    # it runs in its own profile, `artstyle`.
    "quick": BenchProfile("quick", ["figures"],
                          ["none", "random", "importance-ratio", "freeze-cross-attention", "freeze-resnets", "guard",
                           "freeze-cross-attention+immunise", "guard+freeze-cross-attention+immunise@0.3"],
                          [0.3, 0.5], [0, 1], legal_steps=800, n_samples=200,
                          curve_cells=["none", "random@0.3", "guard@0.3", "freeze-cross-attention+immunise",
                                       "guard+freeze-cross-attention+immunise@0.3"],
                          curve_steps=[25, 50, 100, 200, 400], legal_curve_steps=[200, 400],
                          options=default_options()),
    # full: every method, the whole frontier, three seeds, longer curves: for a GPU.
    "full": BenchProfile("full", ["figures", "artstyle", "figures-scratch", "artstyle-scratch"],
                         FRONTIER_METHODS + ["importance-change", "importance-grad", "uce", "imma", "uce+guard",
                                             "freeze-cross-attention+immunise", "guard+immunise", "random+immunise",
                                             "guard+freeze-kv+immunise", "guard+freeze-cross-attention+immunise",
                                             "freeze-cross-attention+immunise+guard"],
                         [0.1, 0.2, 0.3, 0.5, 0.7], [0, 1, 2], legal_steps=1600, n_samples=400,
                         curve_cells=["none", "random@0.3", "importance-ratio@0.3", "guard@0.3", "guard@0.5"],
                         curve_steps=[25, 50, 100, 200, 400, 800, 1600], legal_curve_steps=[200, 400, 800],
                         options=default_options(), attacks=list(_battery())),
    # attacks: the battery (freezeasguard.attacks.BATTERY) against the methods that matter, on figures, two seeds:
    # full fine-tuning, random freezing at 0.3 (the floor), the paper's learned guard at 0.3, and the project's
    # best release (all cross-attention with token-selective immunised values).
    "attacks": BenchProfile("attacks", ["figures"],
                            ["none", "random@0.3", "guard@0.3", STRONGEST_RELEASE], [0.3], [0, 1],
                            legal_steps=800, n_samples=200, curve_cells=["none", STRONGEST_RELEASE],
                            curve_steps=[25, 50, 100, 200, 400], legal_curve_steps=[200, 400],
                            options=default_options(), attacks=list(_battery())),
}
# artstyle: the same methods and battery on the style scenario, which starts from the wider `embedded-style`
# base (zoo.SCENARIO_BASES). Each setting's validity cells run first, so a void seed costs only those. Random
# freezing and the guard get curves too: figures has theirs from the quick profile, artstyle only from this one.
PROFILES["artstyle"] = replace(PROFILES["attacks"], name="artstyle", scenarios=["artstyle"],
                              curve_cells=["none", "random@0.3", "guard@0.3", STRONGEST_RELEASE])

# Names the protections had before the composite grammar (`A+B`, left to right): results files written then
# are read under today's names.
FORMER_NAMES = {
    "guard+uce": "uce+guard",
    "guard+kv+immunise": "guard+freeze-kv+immunise",
    "guard+xattn+immunise": "guard+freeze-cross-attention+immunise",
    "immunised-xattn+guard": "freeze-cross-attention+immunise+guard",
}


def scenario_form(name: str) -> tuple[str, str]:
    """'figures' -> ('figures', 'relearn'); 'figures-scratch' -> ('figures', 'scratch')."""
    base, _, form = name.partition("-")
    form = form or "relearn"
    if base not in SCENARIOS or form not in FORMS:
        raise ValueError(f"unknown scenario {name!r}: use figures or artstyle, optionally with -scratch")
    return base, form


def parse_cell(spec: str) -> tuple[str, float | None]:
    """'guard@0.3' -> ('guard', 0.3); 'none' -> ('none', None)."""
    method, _, ratio = spec.partition("@")
    try:
        return method, (float(ratio) if ratio else None)
    except ValueError:
        raise ValueError(f"cell {spec!r}: the ratio after '@' must be a number") from None


def cell_key(scenario: str, seed: int, method: str, ratio: float | None, attack: str = "default") -> str:
    """A cell's file name: the default attacker's cells keep their names; another attack's end in --ATTACK."""
    key = f"{scenario}-seed{seed}-{method}" + ("" if ratio is None else f"-r{ratio:g}")
    return key if attack == "default" else f"{key}--{attack}"


def planned_cells(profile: BenchProfile) -> list[tuple[str, float | None, bool]]:
    """(method, ratio, curve) of every cell of a setting, in the profile's order."""
    from ..protections import needs_ratio

    curve_specs = {parse_cell(c) for c in profile.curve_cells}
    out = []
    for spec in profile.methods:
        method, only = parse_cell(spec)  # "NAME@RATIO": that protection at that ratio alone
        takes_ratio = needs_ratio(method)
        if only is not None and not takes_ratio:
            raise ValueError(f"method {spec!r}: {method} takes no ratio")
        ratios = [only] if only is not None else (profile.ratios if takes_ratio else [None])
        for ratio in ratios:
            out.append((method, ratio, (method, ratio) in curve_specs))
    return out


def planned_attack_cells(profile: BenchProfile) -> list[tuple[str, float | None, str]]:
    """(method, ratio, attack) of every battery cell of a setting beyond the default attacker's: full
    fine-tuning (the reference) and every planned protection, under each attack."""
    cells = [(m, r) for m, r, _ in planned_cells(profile)]
    if ("none", None) not in cells:
        cells.insert(0, ("none", None))
    return [(m, r, a) for a in profile.attacks if a != "default" for m, r in cells]


def replace_profile(profile: BenchProfile, **changes: Any) -> BenchProfile:
    """The profile with `changes` (None values ignored): how the CLI narrows a profile."""
    known = {f.name for f in fields(BenchProfile)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown profile field(s): {', '.join(unknown)}")
    return replace(profile, **{k: v for k, v in changes.items() if v is not None})


def profile_json(profile: BenchProfile) -> str:
    return json.dumps(profile.to_dict(), indent=2)
