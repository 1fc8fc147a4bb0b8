"""Auditing derivatives against a guard: are the frozen tensors still the released ones, and does no adapter
sit on a frozen module or break the guard's rules?

What is checked is exactly what a loader would load. A model directory (model_index.json) is audited through
its unet/ folder (and an adapter at its root, which `load_lora_weights(dir)` reads); a folder is resolved the
way diffusers resolves it: `diffusion_pytorch_model[.<variant>].safetensors`, or the sharded index
`diffusion_pytorch_model.safetensors.index[.<variant>].json` (which wins when present), for every variant
present; `pytorch_lora_weights.safetensors` / `adapter_model.safetensors` beside them are adapters and are
checked too. Any other weight file in the folder is a finding, never a substitute for the loaded weights. A
file is classified by its whole key set (UNet tensors of the guarded model, adapter keys, or both: a mixed file
is reported as such and every UNet tensor in it is still checked), and every adapter tensor's shape is checked
against the guarded model's fingerprint.

A model directory's text encoders (`text_encoder/`, `text_encoder_2/`) are checked too when the guard keeps
them frozen and records their values: every tensor a loader reads (`model.safetensors`, its sharded index, its
variants) must be the released one. Anything in a model directory that would run code when loaded is a
finding: pickled weights, Python files, a `config.json` with `auto_map`, a component from a library other than
diffusers or transformers. Non-frozen UNet tensors that are absent or reshaped do not break the guard, but a
loader would refuse them or random-initialise them: the report notes them.

Reads only safetensors (lazily, via `safe_open`, so a multi-GB UNet is checked tensor by tensor) and JSON
(each file at most `MAX_JSON_BYTES`): no path reaches pickle or `torch.load`; pickled weights are reported,
unread.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import FreezeAsGuardError
from .guard import COUNT_SKETCH, PRECISION, TEXT_ENCODERS, Guard, dtype_name, record_match, tensor_sketch
from .utils.files import read_json

_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:unet\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora\.down|lora\.up|lora_down"
    r"|lora_up|lora_magnitude_vector|lora_embedding_A|lora_embedding_B|alpha)(?:\..*)?$"
)
_KOHYA = re.compile(r"^(?P<head>lora_(?:unet|te\d?)_[^.]+)\.(?P<part>lora_down|lora_up|alpha|dora_scale)(?:\..*)?$")
_TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_", "te.")
_DOWN, _UP = ("lora_A", "lora.down", "lora_down"), ("lora_B", "lora.up", "lora_up")

# diffusers' names (diffusers.utils.constants) and how it inserts a variant (`_add_variant`).
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET_INDEX = "diffusion_pytorch_model.safetensors.index.json"
ADAPTER_WEIGHTS = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
UNET_CLASSES = ("UNet2DConditionModel",)
_VARIANT = re.compile(r"^diffusion_pytorch_model\.(?P<v>[^-]+)\.safetensors$")
_VARIANT_INDEX = re.compile(r"^diffusion_pytorch_model\.safetensors"
                            r"(?:\.index\.(?P<v>.+)\.json|\.(?P<legacy>.+)\.index\.json)$")
_WEIGHT_FILE = re.compile(r"\.(safetensors|bin|ckpt|pt|pth|pkl|pickle|gguf|msgpack|h5|onnx|pb|flashpack|npz)$"
                          r"|\.index(\.[^.]+)?\.json$", re.IGNORECASE)
_PICKLE = re.compile(r"\.(bin|ckpt|pt|pth|pkl|pickle)$", re.IGNORECASE)
# transformers' names for a text encoder's weights (transformers.utils: SAFE_WEIGHTS_NAME and its index).
TEXT_WEIGHTS = "model.safetensors"
TEXT_INDEX = "model.safetensors.index.json"
_TEXT_VARIANT = re.compile(r"^model\.(?P<v>[^.]+)\.safetensors$|^model\.safetensors\.index\.(?P<iv>[^.]+)\.json$")
_LOADER_LIBRARIES = ("diffusers", "transformers")
# How many entries of a model directory are looked at for code that would run on load: a real one has tens.
_MAX_ENTRIES = 10_000

OK_STATUSES = frozenset({"ok", "ok_lower_precision", "ok_within_tolerance"})


class AuditError(FreezeAsGuardError, ValueError):
    """A derivative (or the base given for comparison) cannot be read, or is not the model it claims to be."""


def printable(text: str) -> str:
    """`text` safe to print on a terminal: every control or non-printable character (a tensor name comes from a
    file anyone can write) shown as a Python escape, so a name can neither clear the screen nor forge a line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


@dataclass
class Finding:
    name: str
    # ok, ok_lower_precision, ok_within_tolerance; changed, missing, shape, duplicate, adapter_on_frozen,
    # adapter_shape, text_encoder_adapter, unrecognised, mixed_file, unexpected_file, unreadable, component,
    # code_on_load
    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES


@dataclass
class AuditReport:
    derivative: str
    kind: str  # "unet", "lora", "unet+lora" (a folder holding both) or "mixed" (one file holding both)
    guard_fingerprint: str
    checked: int
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def violations(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    @property
    def compliant(self) -> bool:
        return not self.violations

    def describe(self, limit: int = 20) -> str:
        bad = self.violations
        if not bad:
            what = {"unet": "frozen tensor(s)", "lora": "adapted module(s)"}.get(self.kind, "tensor(s) and module(s)")
            return f"compliant: {self.checked} {what} checked"
        lines = [f"{printable(f.name)}: {f.status}" + (f" ({printable(f.detail)})" if f.detail else "")
                 for f in bad[:limit]]
        more = f"; ... and {len(bad) - limit} more" if len(bad) > limit else ""
        return f"{len(bad)} violation(s): " + "; ".join(lines) + more

    def to_dict(self) -> dict[str, Any]:
        return {
            "derivative": self.derivative,
            "kind": self.kind,
            "compliant": self.compliant,
            "checked": self.checked,
            "guard_fingerprint": self.guard_fingerprint,
            "violations": [asdict(f) for f in self.violations],
            "passed_with_notes": [asdict(f) for f in self.findings if f.ok and f.status != "ok"],
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------- tensor checks
def _max_diff(t: torch.Tensor, b: torch.Tensor) -> float:
    return float((t.double() - b.detach().cpu().double()).abs().max()) if t.numel() else 0.0


def _sketch_distance(t: torch.Tensor, record: Mapping[str, Any], spec: Mapping[str, Any]) -> float:
    """Estimated ||t - base||_2 / ||base||_2 from the guard's value sketch of the base."""
    ours = torch.tensor(tensor_sketch(t, k=spec["k"], seed=spec["seed"], method=spec["method"]), dtype=torch.float64)
    theirs = torch.tensor(record["sketch"], dtype=torch.float64)
    return float((ours - theirs).pow(2).sum().sqrt()) / max(float(record["norm"]), 1e-12)


def _check_one(name: str, t: torch.Tensor, record: Mapping[str, Any], shape: list[int], guard: Guard,
               base: Any, tolerance: float | None) -> Finding:
    if list(t.shape) != list(shape):
        return Finding(name, "shape", f"shape {list(t.shape)}, guard expects {shape}")
    t = t.detach().cpu()
    match = record_match(t, record)
    if match == "ok_lower_precision":
        return Finding(name, match, f"stored as {dtype_name(t.dtype)}; equals the base ({record['dtype']}) rounded "
                                    f"to {dtype_name(t.dtype)}")
    if match is not None:
        return Finding(name, match)
    got, want = dtype_name(t.dtype), record["dtype"]
    lower = PRECISION.get(got, 0) < PRECISION.get(want, 0)
    b = base(name) if base is not None else None
    if tolerance:  # 0 means exact: the digest check above decided, and no estimate may pass a tensor
        if b is not None:
            err = _max_diff(t, b)
            scale = max(float(b.detach().abs().max()) if b.numel() else 0.0, 1e-12)
            if err <= tolerance * scale:
                return Finding(name, "ok_within_tolerance", f"{got}; max |diff| {err:.3g} <= {tolerance:g} x max|base|")
            return Finding(name, "changed", f"{got}; max |diff| {err:.3g} > {tolerance:g} x max|base| {scale:.3g}")
        if guard.sketch is not None and "sketch" in record:
            rel = _sketch_distance(t, record, guard.sketch)
            how = (f"relative L2 distance from the base ~{rel:.3g}, estimated from the guard's "
                   f"{guard.sketch['k']}-value sketch")
            if rel <= tolerance:
                return Finding(name, "ok_within_tolerance", f"{got}; {how} <= {tolerance:g}")
            return Finding(name, "changed", f"{got}; {how} > {tolerance:g}")
        norm = float(t.double().norm())
        ref = float(record["norm"])
        how = (f"norm {norm:.6g} vs base {ref:.6g} (norm only: this guard file has no value sketches; pass --base "
               "for an elementwise check)")
        if abs(norm - ref) <= tolerance * max(ref, 1e-12):
            return Finding(name, "ok_within_tolerance", f"{got}; {how}")
        return Finding(name, "changed", f"{got}; {how}")
    detail = f"{got}; max |diff| from base {_max_diff(t, b):.3g}" if b is not None else \
        f"{got}; content digest differs from the guard's record"
    if lower:
        detail += f" (stored in {got}, lower than the base's {want}: use a tolerance to accept rounding)"
    return Finding(name, "changed", detail)


def _checked_base(guard: Guard, base: Mapping[str, torch.Tensor], label: str):  # type: ignore[no-untyped-def]
    """A lookup into the base that first proves each tensor it returns is the guard's base tensor: a base
    that is not the guard's base would make any derivative "within tolerance" of itself."""
    def get(name: str) -> torch.Tensor:
        if name not in base:
            raise AuditError(f"{label}: the base lacks frozen tensor {name!r}")
        b = base[name]
        shape = guard.fingerprint["tensors"][name][0]
        if list(b.shape) != list(shape) or record_match(b, guard.tensors[name]) is None:
            raise AuditError(f"{label}: base tensor {name!r} does not match the guard's record (shape "
                             f"{list(b.shape)}, {dtype_name(b.dtype)}): this is not the base the guard was made for")
        return b
    return get


def check_tensors(guard: Guard, tensors: Mapping[str, torch.Tensor], *, base: Mapping[str, torch.Tensor] | None = None,
                  tolerance: float | None = None, derivative: str = "<in memory>", base_label: str = "base") -> AuditReport:
    """Check every frozen tensor of `guard` in `tensors` (a UNet state dict, possibly lazy). A `base` is used
    only where a tensor differs from the record, and each base tensor used is first checked against the record."""
    _check_tolerance(tolerance)
    report = AuditReport(derivative, "unet", guard.fingerprint["digest"], checked=len(guard.frozen))
    shapes = guard.fingerprint["tensors"]
    lookup = _checked_base(guard, base, base_label) if base is not None else None
    for name in guard.frozen:
        if name not in tensors:
            report.findings.append(Finding(name, "missing", "frozen tensor absent from the derivative"))
            continue
        report.findings.append(_check_one(name, tensors[name], guard.tensors[name], shapes[name][0], guard,
                                          lookup, tolerance))
    unknown = [n for n in tensors if n not in shapes]
    if unknown:
        report.notes.append(f"{len(unknown)} tensor(s) not in the guard's base model, e.g. {sorted(unknown)[:3]}")
    if tolerance and base is None and guard.sketch is None:
        report.notes.append("this guard file predates value sketches: without --base, --tolerance compared norms "
                            "only (a negated or permuted tensor keeps its norm); pass --base for a real check")
    elif tolerance and base is None and guard.sketch["method"] == COUNT_SKETCH:
        report.notes.append("this guard file holds count sketches (an older freezeasguard): without --base, "
                            "--tolerance passes values rearranged within a sketch bucket; pass --base, or re-make "
                            "the guard, for a check that a rearrangement cannot pass")
    return report


def _check_tolerance(tolerance: float | None) -> None:
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise AuditError(f"tolerance must be a finite number >= 0, got {tolerance}")


# ---------------------------------------------------------------------------- adapter checks
def frozen_modules(guard: Guard) -> dict[str, list[str]]:
    """Module name -> its frozen tensors (a module owns `module.weight`, `module.bias`, ...)."""
    owners: dict[str, list[str]] = {}
    for name in guard.frozen:
        module, _, _ = name.rpartition(".")
        owners.setdefault(module, []).append(name)
    return owners


def _adapter_key(key: str, modules: set[str], kohya: Mapping[str, str]) -> tuple[str | None, str]:
    """(UNet module the key adapts or None, the adapter part: lora_A, lora.up, alpha, ...)."""
    m = _KOHYA.match(key)
    if m:
        return kohya.get(m.group("head")), m.group("part")
    m = _LORA_KEY.match(key)
    if not m:
        return None, ""
    module = m.group("module")
    if module not in modules:
        module = module.replace(".default", "")
    return (module if module in modules else None), m.group("part")


def is_adapter_key(key: str) -> bool:
    return bool(_KOHYA.match(key) or _LORA_KEY.match(key))


_RESNET_TO_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_TO_SGM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def sgm_names(modules: set[str]) -> dict[str, str]:
    """diffusers UNet module name -> the original (SGM/LDM) name, which kohya's SDXL LoRA keys use
    (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k`). The layout follows from the UNet itself:
    `layers` resnets per down block (one more per up block), and which up blocks hold attentions, exactly as
    the original-checkpoint converters number the blocks. Computed, not looked up, so any UNet2DCondition
    layout maps."""
    downs = [int(m.split(".")[3]) for m in modules if m.startswith("down_blocks.0.resnets.")]
    layers = max(downs) + 1 if downs else 0
    up_attn = {int(m.split(".")[1]) for m in modules if m.startswith("up_blocks.") and ".attentions." in m}
    out = {}
    for m in modules:
        parts = m.split(".")
        head = next((k for k in _TOP_TO_SGM if m == k or m.startswith(k + ".")), None)
        if head is not None:
            out[m] = _TOP_TO_SGM[head] + m[len(head):]
            continue
        if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 3:
            i, kind, j, rest = int(parts[1]), parts[2], parts[3], parts[4:]
            if kind in ("resnets", "attentions"):
                slot = "0" if kind == "resnets" else "1"
                index = (layers + 1) * i + int(j) + (1 if parts[0] == "down_blocks" else 0)
                prefix = f"{'input' if parts[0] == 'down_blocks' else 'output'}_blocks.{index}.{slot}"
            elif kind == "downsamplers" and rest[:1] == ["conv"]:
                prefix, rest = f"input_blocks.{(layers + 1) * (i + 1)}.0.op", rest[1:]
            elif kind == "upsamplers" and rest[:1] == ["conv"]:
                prefix, rest = f"output_blocks.{(layers + 1) * i + layers}.{2 if i in up_attn else 1}.conv", rest[1:]
            else:
                continue
        elif parts[0] == "mid_block" and len(parts) > 2:
            kind, j, rest = parts[1], parts[2], parts[3:]
            prefix = "middle_block." + {"resnets": {"0": "0", "1": "2"}, "attentions": {"0": "1"}}.get(kind, {}).get(j, "")
            if prefix.endswith("."):
                continue
        else:
            continue
        if kind == "resnets" and rest:
            rest = [_RESNET_TO_SGM.get(rest[0], rest[0]), *rest[1:]]
        out[m] = ".".join([prefix, *rest])
    return out


def lora_modules(keys: list[str], guard: Guard) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """Map LoRA state-dict keys to UNet module names: (module -> keys, text-encoder keys, unrecognised keys).
    kohya keys may name a module the diffusers way (SD 1.x/2.x files) or the original way (SDXL files)."""
    modules = {n.rpartition(".")[0] for n in guard.names}
    kohya = {"lora_unet_" + m.replace(".", "_"): m for m in modules}
    kohya.update({"lora_unet_" + sgm.replace(".", "_"): m for m, sgm in sgm_names(modules).items()})
    found: dict[str, list[str]] = {}
    text, unknown = [], []
    for key in keys:
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            text.append(key)
            continue
        module, _ = _adapter_key(key, modules, kohya)
        if module is None:
            unknown.append(key)
        else:
            found.setdefault(module, []).append(key)
    return found, text, unknown


def _shape_problem(part: str, shape: list[int], weight: list[int], rank: int | None) -> str | None:
    """What a `part` tensor of a LoRA on a Linear/Conv2d module with weight shape `weight` must look like (peft
    and kohya: down/A is [r, in, *kernel], up/B is [out, r, 1, 1...], alpha one number, DoRA magnitude [out])."""
    if part in _DOWN:
        if len(shape) != len(weight) or shape[1:2] != weight[1:2] or (len(weight) > 2 and shape[2:] != weight[2:]):
            return f"down/A must be [rank, {', '.join(map(str, weight[1:]))}]"
    elif part in _UP:
        ones = [1] * (len(weight) - 2)
        if len(shape) != len(weight) or shape[0] != weight[0] or shape[2:] != ones or (rank is not None and shape[1] != rank):
            return f"up/B must be [{weight[0]}, {rank if rank is not None else 'rank'}{''.join(', 1' for _ in ones)}]"
    elif part == "alpha":
        if math.prod(shape) != 1:
            return "alpha must be one number"
    elif part == "lora_magnitude_vector" and math.prod(shape) != weight[0]:
        return f"the magnitude vector must hold {weight[0]} values"
    return None


def check_lora(guard: Guard, keys: list[str], *, shapes: Mapping[str, list[int]] | None = None,
               derivative: str = "<in memory>") -> AuditReport:
    """Check adapter keys (and, given `shapes`, their shapes) against `guard`: no adapter on a module owning a
    frozen tensor, none on the text encoder unless the guard allows training it, every key naming a module of
    the guarded UNet with the shape an adapter of that module has."""
    found, text, unknown = lora_modules(keys, guard)
    owners = frozen_modules(guard)
    report = AuditReport(derivative, "lora", guard.fingerprint["digest"], checked=len(found))
    fp = guard.fingerprint["tensors"]
    modules = {n.rpartition(".")[0] for n in guard.names}
    kohya = {"lora_unet_" + m.replace(".", "_"): m for m in modules}
    for module in sorted(found):
        if module in owners:
            report.findings.append(Finding(module, "adapter_on_frozen",
                                           f"adapter on a module owning frozen tensor(s) {owners[module]}"))
            continue
        problems = []
        weight = fp.get(f"{module}.weight", [None])[0]
        if shapes is not None and weight is not None:
            parts = {key: _adapter_key(key, modules, kohya)[1] for key in found[module]}
            ranks = {shapes[k][0] for k, p in parts.items() if p in _DOWN and shapes[k]}
            rank = next(iter(ranks)) if len(ranks) == 1 else None
            for key, part in sorted(parts.items()):
                problem = _shape_problem(part, list(shapes[key]), list(weight), rank)
                if problem:
                    problems.append(f"{key} has shape {list(shapes[key])}; on {module} (weight {list(weight)}) {problem}")
        if problems:
            report.findings.append(Finding(module, "adapter_shape", "; ".join(problems[:3])))
        else:
            report.findings.append(Finding(module, "ok"))
    if unknown:
        report.findings.extend(Finding(k, "unrecognised", "adapter key names no module of the guarded UNet")
                               for k in unknown[:20])
    if text and not guard.allow_text_encoder:
        # the same rule finetune enforces: a guard that keeps the text encoder frozen forbids adapting it
        report.findings.append(Finding("text_encoder", "text_encoder_adapter",
                                       f"{len(text)} text-encoder adapter tensor(s), e.g. {text[:2]}; this guard keeps "
                                       "the text encoder frozen (allow_text_encoder is false)"))
    elif text:
        report.notes.append(f"{len(text)} text-encoder adapter tensor(s): allowed by this guard (allow_text_encoder)")
    return report


# ---------------------------------------------------------------------------- files on disk
class _LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only mapping over one or more safetensors files; tensors load on access. A key held by two
    files is recorded in `duplicates` (which one a loader keeps depends on the loader)."""

    def __init__(self, files: list[Path], rename: Mapping[str, str] | None = None) -> None:
        from safetensors import safe_open

        self._where: dict[str, tuple[Any, str]] = {}
        self.duplicates: list[str] = []
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
                keys = list(h.keys())
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise AuditError(f"{f}: not a readable safetensors file ({exc})") from exc
            for key in keys:
                name = (rename or {}).get(key, key)
                if name in self._where:
                    self.duplicates.append(name)
                self._where[name] = (h, key)

    def __getitem__(self, name: str) -> torch.Tensor:
        h, key = self._where[name]
        return h.get_tensor(key)

    def shape(self, name: str) -> list[int]:
        h, key = self._where[name]
        return list(h.get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


@dataclass
class _Target:
    """One set of files a loader reads as one state dict."""

    label: str
    files: list[Path]


def _unet_targets(folder: Path, prefix: str) -> tuple[list[_Target], set[Path], list[Finding]]:
    """What diffusers' `ModelMixin.from_pretrained(folder[, variant=v])` reads, for every variant present:
    the sharded index when it exists, else the single file. Returns targets, files they use, findings."""
    names = {p.name for p in folder.iterdir() if p.is_file()}
    variants: list[str | None] = [None]
    for n in sorted(names):
        m = _VARIANT.match(n) or _VARIANT_INDEX.match(n)
        v = m and (m.groupdict().get("v") or m.groupdict().get("legacy"))
        if v and v not in variants and "index" not in v:
            variants.append(v)
    targets, used, findings = [], set(), []
    for v in variants:
        index_names = [UNET_INDEX] if v is None else [f"diffusion_pytorch_model.safetensors.index.{v}.json",
                                                      f"diffusion_pytorch_model.safetensors.{v}.index.json"]
        index = next((folder / n for n in index_names if n in names), None)
        single = UNET_WEIGHTS if v is None else f"diffusion_pytorch_model.{v}.safetensors"
        if index is not None:
            used.add(index)
            shards = _shards(index)
            files = []
            for shard in shards:
                path = folder / str(shard)
                if not path.is_file():
                    raise AuditError(f"{index}: names shard {shard!r}, which does not exist")
                used.add(path)
                if path.suffix != ".safetensors":
                    findings.append(Finding(f"{prefix}{shard}", "unreadable",
                                            "a shard a loader would read is not safetensors; it is never unpickled here"))
                else:
                    files.append(path)
            if files:
                targets.append(_Target(f"{prefix}{index.name}", files))
        elif single in names:
            used.add(folder / single)
            targets.append(_Target(f"{prefix}{single}", [folder / single]))
    return targets, used, findings


def _resolve(path: Path) -> tuple[list[_Target], list[_Target], list[Finding], list[str]]:
    """(UNet-named targets, adapter-named targets, findings, notes) for a derivative path."""
    if not path.exists():
        raise AuditError(f"{path}: does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise AuditError(f"{path}: only .safetensors files are read (pickled .bin/.ckpt/.pt files are never loaded)")
        return [_Target(path.name, [path])], [], [], []
    findings: list[Finding] = []
    notes: list[str] = []
    folders = [(path, "", True)]
    if (path / "model_index.json").is_file():
        index = read_json(path / "model_index.json", "model index", AuditError)
        entry = index.get("unet") if isinstance(index, dict) else None
        if not (path / "unet").is_dir():
            raise AuditError(f"{path}: model directory has no unet/ folder")
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] in UNET_CLASSES and entry[0] == "diffusers"):
            findings.append(Finding("model_index.json", "component",
                                    f"unet is {entry!r}; a loader would build something other than diffusers' "
                                    f"{'/'.join(UNET_CLASSES)}, so the audited weights are not what runs"))
        folders = [(path, "", False), (path / "unet", "unet/", True)]
        findings += _code_on_load(path, index)
    unet_targets: list[_Target] = []
    adapters: list[_Target] = []
    for folder, prefix, holds_unet in folders:
        # the root of a model directory holds no UNet (a loader reads unet/): its weight files are findings
        targets, used, found = _unet_targets(folder, prefix) if holds_unet else ([], set(), [])
        unet_targets += targets
        findings += found
        for name in ADAPTER_WEIGHTS:
            if (folder / name).is_file():
                adapters.append(_Target(f"{prefix}{name}", [folder / name]))
                used.add(folder / name)
        for p in sorted(folder.iterdir()):
            if p.is_file() and p not in used and _WEIGHT_FILE.search(p.name):
                why = ("pickled weights: never loaded here" if _PICKLE.search(p.name)
                       else "not a name a loader reads for this folder")
                findings.append(Finding(f"{prefix}{p.name}", "unreadable" if _PICKLE.search(p.name) else "unexpected_file",
                                        f"{why}; a weight file beside the loaded weights is never a substitute for them"))
    if not unet_targets and not adapters:
        found = sorted(f.name for f in findings)
        raise AuditError(f"{path}: no weights under a name a loader reads ({UNET_WEIGHTS} or a variant, "
                         f"{UNET_INDEX}, {' or '.join(ADAPTER_WEIGHTS)})" + (f"; found {found}" if found else "")
                         + "; to audit a file under another name, pass the file itself")
    return unet_targets, adapters, findings, notes


def _shards(index: Path) -> list[str]:
    """The shard files a sharded-weights index names (diffusers' and transformers' `weight_map`)."""
    data = read_json(index, "sharded-weights index", AuditError)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise AuditError(f"{index}: not a sharded-weights index (no 'weight_map' of tensor name -> file name)")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard:  # a loader joins it to the folder: no path may leave it
            raise AuditError(f"{index}: shard {shard!r} is not a file name in the index's folder")
    return shards


def _loader_library(name: Any) -> bool:
    """diffusers or transformers, or one of diffusers' own pipeline folders, which model indexes name directly
    (SD 1.5's safety checker is ["stable_diffusion", "StableDiffusionSafetyChecker"]). Found on disk, so that
    verify does not import diffusers."""
    import importlib.util

    if name in _LOADER_LIBRARIES:
        return True
    if not (isinstance(name, str) and name.isidentifier()):
        return False
    spec = importlib.util.find_spec("diffusers")
    return any((Path(where) / "pipelines" / name / "__init__.py").is_file()
               for where in (spec.submodule_search_locations or []) if spec)


def _code_on_load(path: Path, index: Any) -> list[Finding]:
    """What in a model directory would run code when a loader reads it (see the module docstring). The root and
    unet/ weight files are classified by `_resolve`; pickles in the other component folders are found here."""
    findings = []
    if isinstance(index, dict):
        for component, entry in sorted(index.items()):
            if component.startswith("_") or not isinstance(entry, list) or entry[:1] == [None]:
                continue
            if entry[:1] and not _loader_library(entry[0]):
                findings.append(Finding(f"model_index.json:{component}", "code_on_load",
                                        f"component from {entry[0]!r}, not {' or '.join(_LOADER_LIBRARIES)}: a "
                                        "loader imports that module (custom code) to build it"))
        custom = index.get("_class_name")
        if isinstance(custom, list):
            findings.append(Finding("model_index.json:_class_name", "code_on_load",
                                    f"a custom pipeline {custom!r}: a loader runs its module"))
    seen = 0
    for folder in [path, *sorted(p for p in path.iterdir() if p.is_dir())]:
        for p in sorted(folder.iterdir()):
            seen += 1
            if seen > _MAX_ENTRIES:
                return [*findings, Finding(str(path), "unexpected_file", f"more than {_MAX_ENTRIES} entries: "
                                                                         "not a model directory as a loader writes it")]
            rel = p.relative_to(path).as_posix()
            if p.is_dir() and folder is not path:
                findings.append(Finding(rel, "unexpected_file", "a folder inside a component folder: loaders read "
                                                                "files only, and it was not checked"))
            elif p.suffix.lower() == ".py":
                findings.append(Finding(rel, "code_on_load", "Python source in a model directory: a custom-pipeline "
                                                             "or trust_remote_code loader would run it"))
            elif _PICKLE.search(p.name) and folder not in (path, path / "unet"):
                findings.append(Finding(rel, "unreadable", "pickled weights: loading them runs whatever they hold; "
                                                           "never unpickled here"))
            elif p.name == "config.json" and p.is_file():
                config = read_json(p, "component config", AuditError)
                if isinstance(config, dict) and config.get("auto_map"):
                    findings.append(Finding(rel, "code_on_load", "'auto_map' points a loader at custom model code"))
    return findings


def _text_encoder_targets(folder: Path, prefix: str) -> list[_Target]:
    """What transformers' `from_pretrained(folder[, variant=v])` reads, for every variant present: the sharded
    index when it exists, else `model[.v].safetensors`."""
    names = {p.name for p in folder.iterdir() if p.is_file()}
    variants = sorted({m.group("v") or m.group("iv") for n in names if (m := _TEXT_VARIANT.match(n))})
    targets = []
    for v in [None, *variants]:
        index = TEXT_INDEX if v is None else f"model.safetensors.index.{v}.json"
        single = TEXT_WEIGHTS if v is None else f"model.{v}.safetensors"
        if index in names:
            targets.append(_Target(f"{prefix}{index}", [folder / shard for shard in _shards(folder / index)]))
        elif single in names:
            targets.append(_Target(f"{prefix}{single}", [folder / single]))
    return targets


def check_text_encoders(path: Path, guard: Guard) -> tuple[list[Finding], list[str], int]:
    """(findings, notes, tensors checked) for the text encoders of the model directory `path` against the
    values `guard` recorded for them."""
    if guard.allow_text_encoder:
        return [], ["this guard lets the text encoder train: its values were not checked"], 0
    if guard.text_encoders is None:
        return [], ["this guard file records no text-encoder values (made from a UNet alone, or by an older "
                    "freezeasguard): a retrained text encoder is not detected; re-make the guard from the model"], 0
    findings, notes, checked = [], [], 0
    for component in TEXT_ENCODERS:
        records = guard.text_encoders.get(component)
        folder = path / component
        if records is None:
            if folder.is_dir():
                notes.append(f"{component}/ is not one the guard recorded: not checked")
            continue
        targets = _text_encoder_targets(folder, f"{component}/") if folder.is_dir() else []
        if not targets:
            findings.append(Finding(f"{component}/", "missing", f"no {TEXT_WEIGHTS} (or its index or a variant): "
                                                                "the guard keeps this text encoder frozen"))
            continue
        for target in targets:
            for f in target.files:
                if not f.is_file():
                    raise AuditError(f"{target.label}: names shard {f.name!r}, which does not exist")
            tensors = _LazyTensors(target.files)
            checked += len(records)
            for name, record in records.items():
                label = f"{target.label}:{name}"
                if name not in tensors:
                    findings.append(Finding(label, "missing", "a frozen text-encoder tensor absent from the derivative"))
                elif record_match(tensors[name], record) is None:
                    t = tensors[name]
                    findings.append(Finding(label, "changed", f"{dtype_name(t.dtype)} {list(t.shape)}; differs from "
                                                              "the released text encoder, which the guard keeps frozen"))
            extra = sorted(set(tensors) - set(records))
            if extra:
                notes.append(f"{target.label}: {len(extra)} tensor(s) the released text encoder lacks, e.g. {extra[:3]}")
    return findings, notes, checked


def _classify(keys: list[str], guard: Guard) -> tuple[dict[str, str], list[str], list[str]]:
    """Split a file's keys: UNet tensors of the guarded model (key -> name; an optional 'unet.' prefix is
    dropped), adapter keys, and other keys."""
    names = set(guard.names)
    unet, adapter, other = {}, [], []
    for key in keys:
        name = key[len("unet."):] if key.startswith("unet.") and key[len("unet."):] in names else key
        if name in names:
            unet[key] = name
        elif is_adapter_key(key):
            adapter.append(key)
        else:
            other.append(key)
    return unet, adapter, other


def _audit_target(target: _Target, guard: Guard, named_adapter: bool, base: Any, base_label: str,
                  tolerance: float | None) -> AuditReport:
    probe = _LazyTensors(target.files)
    unet, adapter, other = _classify(list(probe), guard)
    tensors = _LazyTensors(target.files, rename=unet)
    findings: list[Finding] = []
    if unet and adapter:
        findings.append(Finding(target.label, "mixed_file",
                                f"holds {len(unet)} UNet tensor(s) and {len(adapter)} adapter tensor(s), e.g. "
                                f"{adapter[:2]}: neither a clean UNet nor a clean adapter; both parts are checked"))
    for name in sorted(set(tensors.duplicates)):
        findings.append(Finding(name, "duplicate", f"{target.label}: held twice; a loader keeps one of them"))
    is_adapter = bool(adapter) and not unet
    if not unet and not adapter and any(k.startswith("model.diffusion_model.") for k in other):
        raise AuditError(f"{target.files[0]}: an original-LDM single-file checkpoint; convert it to the diffusers "
                         "layout (diffusers' from_single_file, then save_pretrained) before auditing")
    if is_adapter or (named_adapter and not unet):
        report = check_lora(guard, adapter + other, shapes={k: probe.shape(k) for k in adapter + other},
                            derivative=target.label)
    else:
        report = check_tensors(guard, _Subset(tensors, set(unet.values())), base=base, tolerance=tolerance,
                               derivative=target.label, base_label=base_label)
        if adapter:
            lora = check_lora(guard, adapter, shapes={k: probe.shape(k) for k in adapter}, derivative=target.label)
            report.findings += lora.findings
            report.notes += lora.notes
            report.checked += lora.checked
            report.kind = "mixed"
        if other:  # not a clean UNet: a UNet loader would ignore them, another loader might not
            report.findings.append(Finding(target.label, "unrecognised",
                                           f"{len(other)} key(s) that are neither UNet tensors of the guarded model "
                                           f"nor adapter keys, e.g. {sorted(other)[:3]}"))
        report.notes += _loadability_notes(guard, {n: probe.shape(k) for k, n in unet.items()}, target.label)
        stored = {dtype_name(tensors[n].dtype) for n in guard.frozen[:1] if n in tensors}
        if stored:
            report.notes.append(f"{target.label}: stored as {', '.join(sorted(stored))}")
    report.findings[:0] = findings
    return report


def _loadability_notes(guard: Guard, shapes: Mapping[str, list[int]], label: str) -> list[str]:
    """Non-frozen UNet tensors a loader would not load as released: absent (diffusers refuses the file, or
    random-initialises them when told to) or reshaped (it refuses)."""
    frozen = set(guard.frozen)
    expected = guard.fingerprint["tensors"]
    absent = sorted(n for n in expected if n not in shapes and n not in frozen)
    reshaped = sorted(n for n, shape in shapes.items() if n not in frozen and list(shape) != list(expected[n][0]))
    notes = []
    if absent:
        notes.append(f"{label}: {len(absent)} non-frozen UNet tensor(s) absent, e.g. {absent[:3]}: a loader refuses "
                     "this UNet or random-initialises them, so it does not run as released")
    if reshaped:
        notes.append(f"{label}: {len(reshaped)} non-frozen UNet tensor(s) reshaped, e.g. "
                     + ", ".join(f"{n} {list(shapes[n])} (released {expected[n][0]})" for n in reshaped[:3])
                     + ": a loader refuses this UNet")
    return notes


class _Subset(Mapping[str, torch.Tensor]):
    """The UNet tensors of a lazy file mapping (its adapter and unknown keys left out)."""

    def __init__(self, tensors: _LazyTensors, names: set[str]) -> None:
        self._tensors, self._names = tensors, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names))

    def __len__(self) -> int:
        return len(self._names)


def _base_tensors(base: str | Path) -> Mapping[str, torch.Tensor]:
    unets, adapters, _, _ = _resolve(Path(base))
    default = [t for t in unets if t.label.endswith((UNET_WEIGHTS, UNET_INDEX))] or unets
    if not default:
        raise AuditError(f"{base}: the base must be a UNet or model directory, not an adapter")
    keys = list(_LazyTensors(default[0].files))
    strip = bool(keys) and all(k.startswith("unet.") for k in keys)
    return _LazyTensors(default[0].files, rename={k: k[len("unet."):] for k in keys} if strip else None)


def verify(derivative: str | Path, guard: Guard, *, base: str | Path | None = None,
           tolerance: float | None = None) -> AuditReport:
    """Audit a derivative on disk against `guard`; see the module docstring for what it reads and how.

    `base` (the guard's base model, checked tensor by tensor against the guard's record before use) and
    `tolerance` accept frozen tensors that differ by rounding: with the base, max |diff| <= tolerance x
    max |base| per tensor; without it, the relative L2 distance estimated from the guard's value sketch."""
    _check_tolerance(tolerance)
    path = Path(derivative)
    try:
        unets, adapters, findings, notes = _resolve(path)
        base_map = _base_tensors(base) if base is not None else None
        reports = [_audit_target(t, guard, False, base_map, str(base), tolerance) for t in unets]
        reports += [_audit_target(t, guard, True, base_map, str(base), tolerance) for t in adapters]
        if path.is_dir() and (path / "model_index.json").is_file():
            text_findings, text_notes, text_checked = check_text_encoders(path, guard)
            findings += text_findings
            notes += text_notes
        else:
            text_checked = 0
            if guard.text_encoders is not None:
                notes.append("only the UNet or an adapter was given: the text encoder(s) this guard keeps frozen were "
                             "not checked (audit the model directory to check them)")
    except OSError as exc:  # unreadable folder or file: name it instead of a traceback
        raise AuditError(f"{exc.filename or path}: cannot be read ({exc.strerror or exc})") from exc
    if len(reports) == 1 and not findings:
        report = reports[0]
        report.derivative = str(derivative)
        report.notes += notes
        report.checked += text_checked
        return report
    kinds = {r.kind for r in reports}
    kind = kinds.pop() if len(kinds) == 1 else ("mixed" if "mixed" in kinds else "unet+lora")
    report = AuditReport(str(derivative), kind, guard.fingerprint["digest"],
                         checked=sum(r.checked for r in reports) + text_checked, findings=list(findings), notes=list(notes))
    for r in reports:
        for f in r.findings:
            report.findings.append(Finding(f.name, f.status, f"{r.derivative}: {f.detail}" if f.detail else r.derivative))
        report.notes += [n if n.startswith(r.derivative) else f"{r.derivative}: {n}" for n in r.notes]
    return report
