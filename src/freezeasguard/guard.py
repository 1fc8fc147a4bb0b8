"""The guard: which UNet tensors are frozen, keyed by name, with what it takes to check a derivative.

A guard file is one JSON document (format `freezeasguard-guard`, version 1):

- `frozen`: sorted UNet tensor names (as in `unet.named_parameters()`);
- `fingerprint`: name -> [shape, dtype] of every UNet tensor of the base, and its digest, so a guard applied
  to another model fails loudly instead of freezing the wrong tensors (the authors' mask is 0/1 by position);
- `tensors`: for each frozen tensor, SHA-256 digests of its bytes in float32, float16 and bfloat16, its
  L2 norm and a value sketch (below), so a derivative can be checked without the base weights, including one
  saved in lower precision;
- `sketch`: how the sketches were made: k projections of the tensor onto dense random +-1 directions whose
  signs come from SHAKE-256 of the seed and the tensor's size, so `verify --tolerance` compares values, not
  norms, without the base. Files from older releases hold a count sketch (signed bucket sums), which a
  rearrangement of values within a bucket satisfies; they are still read, and verify says so. Files written
  before sketches existed lack it and fall back to norms;
- `text_encoders`: when the guard keeps the text encoder(s) frozen, per component (`text_encoder`,
  `text_encoder_2`) and tensor, the digests of its values, so a derivative whose text encoder was retrained is
  caught, not only one carrying a text-encoder adapter;
- `scores`: optional per-name soft scores (learned mask, importance) the frozen set was chosen from;
- `ratio`: frozen fraction by tensor count and by parameter count;
- `method`, `provenance` (config, data manifests, seeds, library versions), `created`, `allow_text_encoder`;
- `checksum`: SHA-256 of the canonical JSON of everything else; a corrupted or hand-edited file is refused.

One rule for "is this the base": names and shapes must match, floating dtypes may differ (precision is
storage, not identity), and every frozen tensor must equal the recorded base at its own precision: bit for bit,
the base rounded to a lower-precision float (float16/bfloat16), or an exact upcast of it. `Guard.apply` and the
auditor (`audit.verify`) both use `record_match`, so a model loaded in float16 is accepted by one exactly when
the other accepts a float16 derivative.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .configs import RATIO_BY_DEFAULT, check_ratio_by
from .errors import FreezeAsGuardError
from .utils.files import atomic_write_text

GUARD_FORMAT = "freezeasguard-guard"
GUARD_VERSION = 1
CAST_DTYPES = ("float32", "float16", "bfloat16")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# Bits of mantissa+exponent, to tell a tensor stored in lower precision from one that changed.
PRECISION = {"float64": 64, "float32": 32, "bfloat16": 16, "float16": 16, "float8_e4m3fn": 8, "float8_e5m2": 8}
# The value sketch stored per frozen tensor (see `tensor_sketch`). 16 projections estimate the L2 distance of a
# derivative's tensor from the base within about +-25% (chi distribution with 16 degrees of freedom), which
# separates rounding (relative error ~1e-3) from a real change (~1) by orders of magnitude.
SKETCH = {"method": "rademacher/shake256", "k": 16, "seed": 0}
# Sketch methods a guard file may name, and the numbers of projections (k) each allows. The count sketch is the
# one older releases wrote: still read, never written (a rearrangement within its buckets leaves it unchanged).
SKETCH_METHODS = {"rademacher/shake256": (8, 16, 32, 64, 128), "count-sketch/shake256": (1, 2, 4, 8, 16, 32, 64, 128)}
COUNT_SKETCH = "count-sketch/shake256"
# Components whose values a guard that keeps the text encoder frozen records (SDXL has two text encoders).
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_PROJECTION_CHUNK = 1 << 16  # elements per hash call: bounds memory at ~8 MB per chunk whatever the tensor's size


class GuardError(FreezeAsGuardError, ValueError):
    """A guard file is malformed, or does not belong to the model it is used with."""


# ---------------------------------------------------------------------------- tensor digests
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes (bit-exact identity)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{dtype_name(t.dtype)}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensor_sketch(t: torch.Tensor, *, k: int = SKETCH["k"], seed: int = SKETCH["seed"],
                  method: str = SKETCH["method"]) -> list[float]:
    """k random projections of `t` in float64: p_j = sum_i s_ij x_i / sqrt(k), with signs s_ij = +-1 read from
    SHAKE-256 of (seed, numel, chunk) at one bit per element and projection.

    sqrt(sum_j (p_j(a) - p_j(b))^2) estimates ||a - b||_2 without either tensor at hand (within about +-25% at
    k = 16). Every element enters every projection with its own sign, so moving values between positions
    changes the sketch unless the move is orthogonal to all k directions: a permutation, a negation or a
    shuffle within any subset does not pass by chance. The hash, not a library RNG, makes the directions, so any
    release of any library recomputes the same sketch. The seed is public (it is in the guard file): someone who
    knows it can solve for a change in the directions' null space (k linear constraints on millions of values)
    and pass a tolerance check, which is why the exact digest check, not the tolerance, is what a guard
    certifies, and why `--base` gives the elementwise check.

    `method="count-sketch/shake256"` recomputes the sketch older guard files hold (element i adds +-x_i to one
    of k buckets), which a rearrangement of values within a bucket satisfies.
    """
    import numpy as np

    x = t.detach().cpu().reshape(-1).to(torch.float64, copy=True).numpy()
    if method == COUNT_SKETCH:
        stream = hashlib.shake_256(f"freezeasguard-sketch|{seed}|{x.size}".encode()).digest(x.size)
        byte = np.frombuffer(stream, dtype=np.uint8)
        np.negative(x, out=x, where=byte >= 128)
        return np.bincount(byte & (k - 1), weights=x, minlength=k).tolist()
    if method != SKETCH["method"] or k % 8 or k <= 0:
        raise ValueError(f"unknown sketch {method!r} with k={k}")
    out = np.zeros(k)
    for start in range(0, x.size, _PROJECTION_CHUNK):
        chunk = x[start:start + _PROJECTION_CHUNK]
        stream = hashlib.shake_256(f"freezeasguard-projection|{seed}|{x.size}|{start}".encode()).digest(chunk.size * k // 8)
        bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8).reshape(chunk.size, k // 8), axis=1, bitorder="little")
        # s = 1 - 2 bit, so sum_i s_i x_i = sum_i x_i - 2 sum_i bit_i x_i (one matrix-vector product per chunk)
        out += chunk.sum() - 2.0 * (chunk @ bits)
    return (out / math.sqrt(k)).tolist()


def value_record(t: torch.Tensor) -> dict[str, Any]:
    """Its dtype and the digests of its value cast to each float dtype: enough for `record_match`."""
    t = t.detach().cpu()
    if t.is_floating_point():
        return {"dtype": dtype_name(t.dtype), "digests": {name: tensor_digest(t.to(_DTYPES[name])) for name in CAST_DTYPES}}
    return {"dtype": dtype_name(t.dtype), "digests": {dtype_name(t.dtype): tensor_digest(t)}}


def tensor_record(t: torch.Tensor) -> dict[str, Any]:
    """What a guard stores per frozen tensor: its value record, its norm and its value sketch."""
    t = t.detach().cpu()
    return {**value_record(t), "norm": float(t.double().norm()), "sketch": tensor_sketch(t)}


def text_encoder_records(model: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """Component -> tensor name -> value record, for every text encoder `model` has, keyed as its saved state
    dict is (what `verify` reads back from `text_encoder*/model.safetensors`)."""
    out = {}
    for component in TEXT_ENCODERS:
        module = getattr(model, component, None)
        if module is not None:
            out[component] = {n: value_record(t) for n, t in sorted(module.state_dict().items())}
    return out


def record_match(t: torch.Tensor, record: Mapping[str, Any]) -> str | None:
    """The one rule for "is this the recorded base tensor": 'ok' when `t` equals it bit for bit in the base's
    dtype (or is an exact upcast of it), 'ok_lower_precision' when `t` is the base rounded to a lower-precision
    float dtype, None otherwise (shape is checked by the caller)."""
    t = t.detach().cpu()
    got, want = dtype_name(t.dtype), record["dtype"]
    digests = record["digests"]
    if got in digests and tensor_digest(t) == digests[got]:
        return "ok_lower_precision" if PRECISION.get(got, 0) < PRECISION.get(want, 0) else "ok"
    if PRECISION.get(got, 0) > PRECISION.get(want, 0) and want in digests:
        # an upcast of the base (fp16 release, fp32 derivative) is unchanged iff it survives the round trip
        down = t.to(getattr(torch, want))
        if torch.equal(down.to(t.dtype), t) and tensor_digest(down) == digests[want]:
            return "ok"
    return None


def fingerprint_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    entries = {n: [list(t.shape), dtype_name(t.dtype)] for n, t in sorted(tensors.items())}
    return {"digest": fingerprint_digest(entries), "tensors": entries}


def unet_tensors(unet: Any) -> dict[str, torch.Tensor]:
    """Base UNet tensors by name. On a UNet carrying peft adapters, adapter tensors are left out and wrapped
    layers keep their original names (`to_q.base_layer.weight` -> `to_q.weight`)."""
    out = {}
    for name, p in unet.named_parameters():
        if any(part.startswith("lora_") for part in name.split(".")):
            continue
        out[name.replace(".base_layer.", ".")] = p
    return out


def _tensors(unet_or_mapping: Any) -> dict[str, torch.Tensor]:
    return dict(unet_or_mapping) if isinstance(unet_or_mapping, Mapping) else unet_tensors(unet_or_mapping)


def block_of(name: str, depth: int = 2) -> str:
    """Group a UNet tensor name by block: depth 2 gives 'down_blocks.1', 'mid_block', 'conv_in'; depth 3
    splits a block into 'down_blocks.1.attentions', 'down_blocks.1.resnets', ..."""
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        return ".".join(parts[:depth])
    if parts[0] == "mid_block":
        return ".".join(parts[: depth - 1])
    return parts[0]


# ---------------------------------------------------------------------------- the guard
@dataclass
class Guard:
    frozen: tuple[str, ...]
    fingerprint: dict[str, Any]
    tensors: dict[str, dict[str, Any]]
    method: str = "list"
    scores: dict[str, float] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    # The guard covers the UNet. The publisher's path keeps the text encoder frozen unless this says
    # otherwise (a trainable text encoder is how textual-inversion-like bypasses would get in).
    allow_text_encoder: bool = False
    # How the per-tensor value sketches were made; None for files written before sketches existed.
    sketch: dict[str, Any] | None = field(default_factory=lambda: dict(SKETCH))
    # The text encoders' value records (`text_encoder_records`) when the guard keeps them frozen; None when it
    # lets them train, or for a guard made from a UNet alone (see `with_text_encoders`).
    text_encoders: dict[str, dict[str, dict[str, Any]]] | None = None

    # -------------------------------------------------------------- construction
    @classmethod
    def from_names(cls, unet: Any, names: Iterable[str], *, method: str = "list",
                   scores: Mapping[str, float] | None = None, provenance: Mapping[str, Any] | None = None) -> Guard:
        tensors = _tensors(unet)
        frozen = tuple(sorted(set(names)))
        unknown = [n for n in frozen if n not in tensors]
        if unknown:
            raise GuardError(f"{len(unknown)} name(s) are not UNet tensors of this model, e.g. {unknown[:5]}")
        if scores is not None:
            missing = [n for n in tensors if n not in scores]
            if missing:
                raise GuardError(f"scores missing for {len(missing)} tensor(s), e.g. {missing[:5]}")
            scores = {n: float(scores[n]) for n in sorted(tensors)}
        return cls(
            frozen=frozen,
            fingerprint=fingerprint_of(tensors),
            tensors={n: tensor_record(tensors[n]) for n in frozen},
            method=method,
            scores=scores,
            provenance=dict(provenance or {}),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )

    @classmethod
    def from_scores(cls, unet: Any, scores: Mapping[str, float], ratio: float, *, ratio_by: str = RATIO_BY_DEFAULT,
                    method: str = "scores", provenance: Mapping[str, Any] | None = None) -> Guard:
        """Freeze the highest-scoring tensors: exactly round(ratio x N) by count, or the most that fit in
        ratio x total parameters by parameter budget (greedy in score order)."""
        tensors = _tensors(unet)
        names = select_top(scores, {n: t.numel() for n, t in tensors.items()}, ratio, ratio_by=ratio_by)
        prov = {"ratio_requested": ratio, "ratio_by": ratio_by, **dict(provenance or {})}
        return cls.from_names(tensors, names, method=method, scores=scores, provenance=prov)

    @classmethod
    def random(cls, unet: Any, ratio: float, *, seed: int = 0, ratio_by: str = RATIO_BY_DEFAULT,
               provenance: Mapping[str, Any] | None = None) -> Guard:
        """Random freezing at a ratio: the random baseline, seeded."""
        tensors = _tensors(unet)
        g = torch.Generator().manual_seed(seed)
        order = sorted(tensors)
        noise = torch.rand(len(order), generator=g, dtype=torch.float64).tolist()
        scores = dict(zip(order, noise))
        return cls.from_scores(tensors, scores, ratio, ratio_by=ratio_by, method="random",
                               provenance={"seed": seed, **dict(provenance or {})})

    def with_text_encoders(self, model: Any) -> Guard:
        """This guard with the text encoders of `model` (the release it goes with) recorded when it keeps them
        frozen, so `verify` can tell a retrained text encoder from the released one."""
        import dataclasses

        records = None if self.allow_text_encoder else (text_encoder_records(model) or None)
        return dataclasses.replace(self, text_encoders=records)

    # -------------------------------------------------------------- ratios and views
    @property
    def names(self) -> list[str]:
        return list(self.fingerprint["tensors"])

    def numel(self, name: str) -> int:
        return math.prod(self.fingerprint["tensors"][name][0])

    @property
    def ratio_by_count(self) -> float:
        return len(self.frozen) / len(self.fingerprint["tensors"])

    @property
    def ratio_by_params(self) -> float:
        total = sum(self.numel(n) for n in self.names)
        return sum(self.numel(n) for n in self.frozen) / total

    @property
    def _frozen_set(self) -> frozenset[str]:
        return frozenset(self.frozen)

    def digest(self) -> str:
        """SHA-256 of what this guard enforces (base fingerprint, frozen names and their records, the text
        encoder rule), not of when or how it was made: equal digests freeze the same tensors to the same values."""
        body = {"fingerprint": self.fingerprint["digest"], "frozen": list(self.frozen), "tensors": self.tensors,
                "allow_text_encoder": self.allow_text_encoder}
        if self.text_encoders is not None:
            body["text_encoders"] = self.text_encoders
        return _checksum(body)

    def per_block(self, depth: int = 2) -> list[dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        frozen = self._frozen_set
        for name in self.names:
            row = rows.setdefault(block_of(name, depth), {"block": block_of(name, depth), "tensors": 0, "frozen": 0,
                                                           "parameters": 0, "frozen_parameters": 0})
            n = self.numel(name)
            row["tensors"] += 1
            row["parameters"] += n
            if name in frozen:
                row["frozen"] += 1
                row["frozen_parameters"] += n
        return list(rows.values())

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "frozen_tensors": len(self.frozen),
            "total_tensors": len(self.names),
            "ratio_by_count": self.ratio_by_count,
            "ratio_by_params": self.ratio_by_params,
            "fingerprint": self.fingerprint["digest"],
        }

    # -------------------------------------------------------------- set algebra
    def _same_base(self, other: Guard, op: str) -> None:
        if self.fingerprint["digest"] != other.fingerprint["digest"]:
            raise GuardError(f"cannot {op} guards of different models (fingerprints "
                             f"{self.fingerprint['digest'][:12]} and {other.fingerprint['digest'][:12]})")
        for n in set(self.frozen) & set(other.frozen):
            if self.tensors[n]["digests"] != other.tensors[n]["digests"]:
                raise GuardError(f"cannot {op} guards whose frozen tensor {n!r} has different values")
        if None not in (self.text_encoders, other.text_encoders) and self.text_encoders != other.text_encoders:
            raise GuardError(f"cannot {op} guards that record different text encoders")

    def _combine(self, other: Guard, names: set[str], op: str, allow_text_encoder: bool) -> Guard:
        records = {**other.tensors, **self.tensors}
        tensors = {n: dict(records[n]) for n in sorted(names)}
        sketch = self.sketch
        if self.sketch != other.sketch:  # sketches made two ways (or one guard predates them): keep none
            sketch = None
            for record in tensors.values():
                record.pop("sketch", None)
        text_encoders = None if allow_text_encoder else (self.text_encoders or other.text_encoders)
        return Guard(frozen=tuple(sorted(names)), fingerprint=self.fingerprint, tensors=tensors, method=op,
                     scores=None, provenance={"op": op, "of": [self.summary(), other.summary()]},
                     created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     allow_text_encoder=allow_text_encoder, sketch=sketch, text_encoders=text_encoders)

    # The text encoder is one more frozen-or-not unit: the union freezes it if either guard does, the
    # intersection only if both do.
    def union(self, other: Guard) -> Guard:
        self._same_base(other, "union")
        return self._combine(other, set(self.frozen) | set(other.frozen), "union",
                             self.allow_text_encoder and other.allow_text_encoder)

    def intersection(self, other: Guard) -> Guard:
        self._same_base(other, "intersect")
        return self._combine(other, set(self.frozen) & set(other.frozen), "intersection",
                             self.allow_text_encoder or other.allow_text_encoder)

    def diff(self, other: Guard) -> dict[str, Any]:
        """Names frozen only here, only in `other`, and in both; and whether each lets the text encoder train."""
        self._same_base(other, "diff")
        a, b = set(self.frozen), set(other.frozen)
        return {"only_self": sorted(a - b), "only_other": sorted(b - a), "both": sorted(a & b),
                "allow_text_encoder": [self.allow_text_encoder, other.allow_text_encoder]}

    # -------------------------------------------------------------- model checks
    def check_fingerprint(self, unet: Any) -> None:
        """Raise GuardError naming the tensors that differ if `unet` is not the model this guard was made for.

        Names and shapes must match; a floating dtype may differ (a model loaded in float16 is the same model:
        its values are checked against the record by `apply`, with the rule the auditor uses)."""
        tensors = _tensors(unet)
        ours = self.fingerprint["tensors"]
        theirs = fingerprint_of(tensors)["tensors"]
        if theirs == ours:
            return
        missing = sorted(set(ours) - set(theirs))
        extra = sorted(set(theirs) - set(ours))
        shape = sorted(n for n in set(ours) & set(theirs) if not _same_entry(ours[n], theirs[n]))
        if not (missing or extra or shape):
            return
        parts = []
        if missing:
            parts.append(f"{len(missing)} guard tensor(s) missing from the model, e.g. {missing[:5]}")
        if extra:
            parts.append(f"{len(extra)} model tensor(s) unknown to the guard, e.g. {extra[:5]}")
        if shape:
            parts.append("shape/dtype differs for " + ", ".join(f"{n}: guard {ours[n]} vs model {theirs[n]}" for n in shape[:5]))
        raise GuardError("the guard was made for another model: " + "; ".join(parts))

    def check_values(self, unet: Any) -> None:
        """Raise GuardError unless `unet` is the model this guard was made for: its fingerprint (names, shapes)
        and the frozen tensors' values, by the rule the auditor uses."""
        self.check_fingerprint(unet)
        tensors = _tensors(unet)
        differ = [n for n in self.frozen if record_match(tensors[n], self.tensors[n]) is None]
        if differ:
            raise GuardError(f"the model's frozen tensors differ from the guard's record, so it is not the base this "
                             f"guard was made for: {len(differ)} tensor(s), e.g. {differ[:5]}")

    def apply(self, unet: Any) -> list[str]:
        """Check the fingerprint and the frozen values, turn off requires_grad on frozen tensors, and return
        the names left trainable."""
        self.check_values(unet)
        trainable = []
        for name, p in unet_tensors(unet).items():
            frozen = name in self._frozen_set
            p.requires_grad_(not frozen)
            if not frozen:
                trainable.append(name)
        return trainable

    # -------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        body = {
            "format": GUARD_FORMAT,
            "version": GUARD_VERSION,
            "method": self.method,
            "created": self.created,
            "frozen": list(self.frozen),
            "ratio": {"by_count": self.ratio_by_count, "by_params": self.ratio_by_params},
            "fingerprint": self.fingerprint,
            "tensors": self.tensors,
            "scores": self.scores,
            "provenance": self.provenance,
            "allow_text_encoder": self.allow_text_encoder,
        }
        if self.sketch is not None:
            body["sketch"] = self.sketch
        if self.text_encoders is not None:
            body["text_encoders"] = self.text_encoders
        body["checksum"] = _checksum(body)
        return body

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Guard:
        from .utils.files import read_json

        return cls.from_dict(read_json(path, "guard file", GuardError), source=str(Path(path)))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<guard>") -> Guard:
        def bad(msg: str) -> GuardError:
            return GuardError(f"{source}: {msg}")

        if not isinstance(data, dict) or data.get("format") != GUARD_FORMAT:
            raise bad(f"not a {GUARD_FORMAT} file (missing or wrong 'format')")
        if data.get("version") != GUARD_VERSION:
            raise bad(f"guard format version {data.get('version')!r}; this freezeasguard reads version {GUARD_VERSION}")
        for key, kind in (("frozen", list), ("fingerprint", dict), ("tensors", dict), ("provenance", dict),
                          ("ratio", dict), ("checksum", str)):
            if not isinstance(data.get(key), kind):
                raise bad(f"field {key!r} missing or not a {kind.__name__}")
        body = {k: v for k, v in data.items() if k != "checksum"}
        if _checksum(body) != data["checksum"]:
            raise bad("checksum mismatch: the file was corrupted or edited by hand (make guards with the API or CLI)")
        fp = data["fingerprint"]
        if fingerprint_digest(fp.get("tensors", {})) != fp.get("digest"):
            raise bad("fingerprint digest does not match its tensor list")
        names = fp["tensors"]
        unknown = [n for n in data["frozen"] if n not in names]
        if unknown:
            raise bad(f"frozen names not in the fingerprint: {unknown[:5]}")
        if sorted(set(data["frozen"])) != data["frozen"]:
            raise bad("'frozen' must be sorted and without duplicates")
        if set(data["tensors"]) != set(data["frozen"]):
            raise bad("'tensors' must hold one record per frozen name")
        scores = data.get("scores")
        if scores is not None and (not isinstance(scores, dict) or set(scores) != set(names)):
            raise bad("'scores' must give one score per UNet tensor")
        sketch = data.get("sketch")
        if sketch is not None and not (isinstance(sketch, dict) and sketch.get("k") in SKETCH_METHODS.get(sketch.get("method"), ())
                                       and isinstance(sketch.get("seed"), int)):
            allowed = "; ".join(f"{m!r} with k in {ks}" for m, ks in SKETCH_METHODS.items())
            raise bad(f"'sketch' must be {{'method', 'k', 'seed': int}}, one of: {allowed}")
        for name, record in data["tensors"].items():
            problem = _record_problem(record, sketch)
            if problem:
                raise bad(f"record of frozen tensor {name!r}: {problem}")
        allow_text_encoder = bool(data.get("allow_text_encoder", False))
        text_encoders = data.get("text_encoders")
        if text_encoders is not None:
            problem = _text_encoders_problem(text_encoders, allow_text_encoder)
            if problem:
                raise bad(f"'text_encoders': {problem}")
        guard = cls(frozen=tuple(data["frozen"]), fingerprint=fp, tensors=data["tensors"], method=data.get("method", "?"),
                    scores=scores, provenance=data["provenance"], created=data.get("created", ""),
                    allow_text_encoder=allow_text_encoder, sketch=sketch, text_encoders=text_encoders)
        for key, value in (("by_count", guard.ratio_by_count), ("by_params", guard.ratio_by_params)):
            if not math.isclose(float(data["ratio"].get(key, -1)), value, rel_tol=1e-9, abs_tol=1e-12):
                raise bad(f"recorded ratio {key}={data['ratio'].get(key)} does not match the frozen list ({value})")
        return guard


def _record_problem(record: Any, sketch: Mapping[str, Any] | None) -> str | None:
    if not isinstance(record, dict) or not isinstance(record.get("dtype"), str):
        return "not an object with a 'dtype'"
    if not isinstance(record.get("digests"), dict) or not record["digests"]:
        return "no 'digests'"
    if not isinstance(record.get("norm"), (int, float)):
        return "no 'norm'"
    values = record.get("sketch")
    if sketch is None:
        return "a 'sketch' without the file's 'sketch' parameters" if values is not None else None
    if not (isinstance(values, list) and len(values) == sketch["k"]
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
        return f"'sketch' must be {sketch['k']} finite numbers"
    return None


def _text_encoders_problem(value: Any, allow_text_encoder: bool) -> str | None:
    if allow_text_encoder:
        return "recorded, but the guard lets the text encoder train (allow_text_encoder is true)"
    if not isinstance(value, dict) or not value or not set(value) <= set(TEXT_ENCODERS):
        return f"must map one or more of {list(TEXT_ENCODERS)} to their tensors' records"
    for component, records in value.items():
        if not isinstance(records, dict) or not records:
            return f"{component!r} must map tensor names to records"
        for name, record in records.items():
            if not (isinstance(record, dict) and isinstance(record.get("dtype"), str)
                    and isinstance(record.get("digests"), dict) and record["digests"]
                    and all(isinstance(d, str) for d in record["digests"].values())):
                return f"{component}.{name}: a record must hold a 'dtype' and its 'digests'"
    return None


def _same_entry(ours: list[Any], theirs: list[Any]) -> bool:
    """Fingerprint entries [shape, dtype] name the same tensor if the shapes match and the dtypes are equal or
    both floating (precision is storage, not identity)."""
    return list(ours[0]) == list(theirs[0]) and (ours[1] == theirs[1] or (ours[1] in PRECISION and theirs[1] in PRECISION))


def fingerprint_digest(entries: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(sorted(entries.items())), sort_keys=True).encode()).hexdigest()


def _checksum(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def select_top(scores: Mapping[str, float], sizes: Mapping[str, int], ratio: float, *, ratio_by: str = RATIO_BY_DEFAULT) -> list[str]:
    """Names of the highest scores: round(ratio x N) of them (ratio_by='count'), or greedily in score order all that
    fit within ratio x total parameters (ratio_by='params'). Ties break by name, so the result is deterministic."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"freeze ratio must be in [0, 1], got {ratio}")
    missing = [n for n in sizes if n not in scores]
    if missing:
        raise ValueError(f"no score for {len(missing)} tensor(s), e.g. {missing[:5]}")
    bad = [n for n in sizes if not math.isfinite(float(scores[n]))]
    if bad:
        raise ValueError(f"non-finite score for {bad[:5]}")
    order = sorted(sizes, key=lambda n: (-float(scores[n]), n))
    check_ratio_by(ratio_by)
    if ratio_by == "count":
        return sorted(order[: round(ratio * len(order))])
    if ratio_by == "params":
        budget = ratio * sum(sizes.values())
        chosen, used = [], 0
        for n in order:
            if used + sizes[n] <= budget + 1e-9:
                chosen.append(n)
                used += sizes[n]
        return sorted(chosen)
    raise AssertionError(ratio_by)
