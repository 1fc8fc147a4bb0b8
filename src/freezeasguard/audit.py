"""Auditing derivatives against a guard: are the frozen tensors still the released ones, and does no adapter
sit on a frozen module?

Reads only safetensors (lazily, via `safe_open`, so a multi-GB UNet is checked tensor by tensor) and JSON.
A derivative is one of: a model directory (model_index.json + unet/), a UNet folder (config.json +
*.safetensors), a single safetensors UNet state dict, or a LoRA file (peft/diffusers `lora_A`/`lora_B` keys,
or kohya-style `lora_unet_...` keys).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import FreezeAsGuardError
from .guard import Guard, dtype_name, tensor_digest

# Bits of mantissa+exponent, to tell a derivative saved in lower precision from one that changed.
_PRECISION = {"float64": 64, "float32": 32, "bfloat16": 16, "float16": 16, "float8_e4m3fn": 8, "float8_e5m2": 8}
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:unet\.)?(?P<module>.+?)\.(?:lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up"
    r"|lora_magnitude_vector|lora_embedding_A|lora_embedding_B|alpha)(?:\..*)?$"
)
_TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_", "te.")

OK_STATUSES = frozenset({"ok", "ok_lower_precision", "ok_within_tolerance"})


class AuditError(FreezeAsGuardError, ValueError):
    """A derivative cannot be read or is not in a format the auditor understands."""


@dataclass
class Finding:
    name: str
    status: str  # ok, ok_lower_precision, ok_within_tolerance, changed, missing, shape, adapter_on_frozen
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES


@dataclass
class AuditReport:
    derivative: str
    kind: str  # "unet" or "lora"
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
            what = "frozen tensor(s)" if self.kind == "unet" else "adapted module(s)"
            return f"compliant: {self.checked} {what} checked"
        lines = [f"{f.name}: {f.status}" + (f" ({f.detail})" if f.detail else "") for f in bad[:limit]]
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
def _check_one(name: str, t: torch.Tensor, record: Mapping[str, Any], shape: list[int],
               base: torch.Tensor | None, tolerance: float | None) -> Finding:
    if list(t.shape) != list(shape):
        return Finding(name, "shape", f"shape {list(t.shape)}, guard expects {shape}")
    t = t.detach().cpu()
    got, want = dtype_name(t.dtype), record["dtype"]
    digests = record["digests"]
    if got in digests and tensor_digest(t) == digests[got]:
        if _PRECISION.get(got, 0) < _PRECISION.get(want, 0):
            return Finding(name, "ok_lower_precision", f"stored as {got}; equals the base ({want}) rounded to {got}")
        return Finding(name, "ok")
    if _PRECISION.get(got, 0) > _PRECISION.get(want, 0) and want in digests:
        # an upcast of the base (fp16 release, fp32 derivative) is unchanged iff it survives the round trip
        down = t.to(getattr(torch, want))
        if torch.equal(down.to(t.dtype), t) and tensor_digest(down) == digests[want]:
            return Finding(name, "ok")
    lower = _PRECISION.get(got, 0) < _PRECISION.get(want, 0)
    if tolerance is not None:
        if base is not None:
            b = base.detach().cpu().double()
            err = float((t.double() - b).abs().max()) if t.numel() else 0.0
            scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-12)
            if err <= tolerance * scale:
                return Finding(name, "ok_within_tolerance", f"{got}; max |diff| {err:.3g} <= {tolerance:g} x max|base|")
            return Finding(name, "changed", f"{got}; max |diff| {err:.3g} > {tolerance:g} x max|base| {scale:.3g}")
        norm = float(t.double().norm())
        ref = record["norm"]
        if abs(norm - ref) <= tolerance * max(ref, 1e-12):
            return Finding(name, "ok_within_tolerance",
                           f"{got}; norm {norm:.6g} vs base {ref:.6g} (norm only: pass --base for an elementwise check)")
        return Finding(name, "changed", f"{got}; norm {norm:.6g} vs base {ref:.6g}")
    if base is not None:
        err = float((t.double() - base.detach().cpu().double()).abs().max()) if t.numel() else 0.0
        detail = f"{got}; max |diff| from base {err:.3g}"
    else:
        detail = f"{got}; content digest differs from the guard's record"
    if lower:
        detail += f" (stored in {got}, lower than the base's {want}: use a tolerance to accept rounding)"
    return Finding(name, "changed", detail)


def check_tensors(guard: Guard, tensors: Mapping[str, torch.Tensor], *, base: Mapping[str, torch.Tensor] | None = None,
                  tolerance: float | None = None, derivative: str = "<in memory>") -> AuditReport:
    """Check every frozen tensor of `guard` in `tensors` (a UNet state dict, possibly lazy)."""
    report = AuditReport(derivative, "unet", guard.fingerprint["digest"], checked=len(guard.frozen))
    shapes = guard.fingerprint["tensors"]
    for name in guard.frozen:
        if name not in tensors:
            report.findings.append(Finding(name, "missing", "frozen tensor absent from the derivative"))
            continue
        b = base[name] if base is not None and name in base else None
        report.findings.append(_check_one(name, tensors[name], guard.tensors[name], shapes[name][0], b, tolerance))
    unknown = [n for n in tensors if n not in shapes]
    if unknown:
        report.notes.append(f"{len(unknown)} tensor(s) not in the guard's base model, e.g. {sorted(unknown)[:3]}")
    return report


# ---------------------------------------------------------------------------- LoRA checks
def frozen_modules(guard: Guard) -> dict[str, list[str]]:
    """Module name -> its frozen tensors (a module owns `module.weight`, `module.bias`, ...)."""
    owners: dict[str, list[str]] = {}
    for name in guard.frozen:
        module, _, _ = name.rpartition(".")
        owners.setdefault(module, []).append(name)
    return owners


def lora_modules(keys: list[str], guard: Guard) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """Map LoRA state-dict keys to UNet module names: (module -> keys, text-encoder keys, unrecognised keys)."""
    modules = {n.rpartition(".")[0] for n in guard.names}
    kohya = {"lora_unet_" + m.replace(".", "_"): m for m in modules}
    found: dict[str, list[str]] = {}
    text, unknown = [], []
    for key in keys:
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            text.append(key)
            continue
        head = key.split(".", 1)[0]
        if head.startswith("lora_unet_"):
            module = kohya.get(head)
        else:
            m = _LORA_KEY.match(key)
            module = m.group("module") if m else None
            if module is not None and module not in modules:
                module = module.replace(".default", "")
        if module is None or module not in modules:
            unknown.append(key)
        else:
            found.setdefault(module, []).append(key)
    return found, text, unknown


def check_lora(guard: Guard, keys: list[str], *, derivative: str = "<in memory>") -> AuditReport:
    found, text, unknown = lora_modules(keys, guard)
    owners = frozen_modules(guard)
    report = AuditReport(derivative, "lora", guard.fingerprint["digest"], checked=len(found))
    for module in sorted(found):
        if module in owners:
            report.findings.append(Finding(module, "adapter_on_frozen",
                                           f"adapter on a module owning frozen tensor(s) {owners[module]}"))
        else:
            report.findings.append(Finding(module, "ok"))
    if unknown:
        report.findings.extend(Finding(k, "unrecognised", "LoRA key names no module of the guarded UNet") for k in unknown[:20])
    if text:
        report.notes.append(f"{len(text)} text-encoder adapter tensor(s): outside what a UNet guard covers")
    return report


# ---------------------------------------------------------------------------- derivatives on disk
class _LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only mapping over one or more safetensors files; tensors load on access."""

    def __init__(self, files: list[Path], strip_prefix: str = "") -> None:
        from safetensors import safe_open

        self._handles = []
        self._where: dict[str, tuple[Any, str]] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise AuditError(f"{f}: not a readable safetensors file ({exc})") from exc
            self._handles.append(h)
            for key in h.keys():
                name = key[len(strip_prefix):] if strip_prefix and key.startswith(strip_prefix) else key
                self._where[name] = (h, key)

    def __getitem__(self, name: str) -> torch.Tensor:
        h, key = self._where[name]
        return h.get_tensor(key)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _keys(files: list[Path]) -> list[str]:
    return list(_LazyTensors(files))


def _is_lora(keys: list[str]) -> bool:
    return any("lora" in k.lower() for k in keys)


def locate(path: str | Path) -> tuple[str, list[Path]]:
    """('unet' | 'lora', safetensors files) for a derivative path, with errors naming what was expected."""
    p = Path(path)
    if not p.exists():
        raise AuditError(f"{p}: does not exist")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise AuditError(f"{p}: only .safetensors files are read (pickled .bin/.ckpt/.pt files are never loaded)")
        return ("lora" if _is_lora(_keys([p])) else "unet"), [p]
    if (p / "model_index.json").is_file():
        p = p / "unet"
        if not p.is_dir():
            raise AuditError(f"{p}: model directory has no unet/ folder")
    for lora_name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors"):
        if (p / lora_name).is_file():
            return "lora", [p / lora_name]
    files = sorted(p.glob("*.safetensors"))
    if not files:
        pickles = sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".ckpt", ".pt", ".pth"))
        extra = f" (found {pickles}; pickles are never loaded)" if pickles else ""
        raise AuditError(f"{p}: no .safetensors weights{extra}")
    return ("lora" if _is_lora(_keys(files)) else "unet"), files


def verify(derivative: str | Path, guard: Guard, *, base: str | Path | None = None,
           tolerance: float | None = None) -> AuditReport:
    """Audit a derivative on disk against `guard`; see the module docstring for what it accepts."""
    kind, files = locate(derivative)
    if kind == "lora":
        return check_lora(guard, _keys(files), derivative=str(derivative))
    keys = _keys(files)
    prefix = "unet." if keys and all(k.startswith("unet.") for k in keys) else ""
    tensors = _LazyTensors(files, strip_prefix=prefix)
    if not any(n in tensors for n in guard.names[:50]) and any(k.startswith("model.diffusion_model.") for k in keys):
        raise AuditError(f"{derivative}: an original-LDM single-file checkpoint; convert it to the diffusers layout "
                         "(diffusers' from_single_file, then save_pretrained) before auditing")
    base_tensors = None
    if base is not None:
        bkind, bfiles = locate(base)
        if bkind != "unet":
            raise AuditError(f"{base}: the base must be a UNet or model directory, not a LoRA file")
        bkeys = _keys(bfiles)
        bprefix = "unet." if bkeys and all(k.startswith("unet.") for k in bkeys) else ""
        base_tensors = _LazyTensors(bfiles, strip_prefix=bprefix)
    report = check_tensors(guard, tensors, base=base_tensors, tolerance=tolerance, derivative=str(derivative))
    dtypes = {dtype_name(tensors[n].dtype) for n in guard.frozen[:1] if n in tensors}
    if dtypes:
        report.notes.append(f"derivative stored as {', '.join(sorted(dtypes))}")
    return report
