"""What a user receives never shows where the service keeps its files.

Job results, error messages, events and the published JSON artefacts come from code that names files by their
absolute paths (the auditor's report, exception messages). Before any of it reaches a user, paths inside the
job's folder become relative to it (`run/lora/pytorch_lora_weights.safetensors`), the model and the guard
become their names, and any other absolute path becomes its last component.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from .config import ServiceConfig, job_dir

# An absolute POSIX path (not the tail of a relative one or of a URL) or a Windows drive path.
_ABSOLUTE = re.compile(r"(?<![\w.~/:-])(?:/|[A-Za-z]:\\)(?:[^\s/\\'\"`,;:()<>\[\]{}|]+[/\\])*"
                       r"[^\s/\\'\"`,;:()<>\[\]{}|]*")


def _spellings(path: Path) -> list[str]:
    """A path as it may appear: as configured and resolved (a symlinked /tmp, a relative config)."""
    out = {str(path)}
    try:
        out.add(str(path.resolve()))
    except OSError:
        pass
    return sorted(out, key=len, reverse=True)


def _replacements(cfg: ServiceConfig, job_id: str | None) -> tuple[tuple[str, str], ...]:
    return _replacements_of(str(job_dir(cfg, job_id)) if job_id is not None else None, str(cfg.root),
                            cfg.model if cfg.model != "embedded" else None, cfg.guard or None)


@functools.lru_cache(maxsize=256)  # a job listing redacts many strings of the same few jobs
def _replacements_of(job: str | None, root: str, model: str | None, guard: str | None) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[Path, str]] = []
    if job is not None:
        pairs.append((Path(job), ""))
    pairs.append((Path(root), ""))
    if model is not None:
        pairs.append((Path(model), Path(model).name))
    if guard is not None:
        pairs.append((Path(guard), Path(guard).name))
    out = []
    for path, name in pairs:
        for spelled in _spellings(path):
            out.append((spelled.rstrip("/") + "/", f"{name}/" if name else ""))
            out.append((spelled, name or "."))
    return tuple(sorted(out, key=lambda p: len(p[0]), reverse=True))


def redact_text(text: str, cfg: ServiceConfig, job_id: str | None = None, *, unknown_paths: bool = True) -> str:
    """`text` with the service's own paths replaced; with `unknown_paths`, any other absolute path too (leave
    it off for text that quotes the user's own names, such as an archive member called '/tmp/x.png')."""
    for old, new in _replacements(cfg, job_id):
        text = text.replace(old, new)
    return _ABSOLUTE.sub(lambda m: _last_part(m.group(0)), text) if unknown_paths else text


def _last_part(path: str) -> str:
    parts = [p for p in re.split(r"[/\\]", path) if p]
    return parts[-1] if parts else path


def redact(value: Any, cfg: ServiceConfig, job_id: str | None = None) -> Any:
    """`value` (a string, or JSON-like data holding strings, keys included) with every server path replaced."""
    if isinstance(value, str):
        return redact_text(value, cfg, job_id)
    if isinstance(value, dict):
        return {redact(k, cfg, job_id): redact(v, cfg, job_id) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, cfg, job_id) for v in value]
    return value
