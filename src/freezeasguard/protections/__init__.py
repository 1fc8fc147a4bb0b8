"""Protection methods behind one registry: the learned guard and every method it is compared with.

One module per family: `basic` (none, random), `importance`, `components`, `uce`, `imma`, `immunise`, `selection`
(which tensors to immunise), `nullspace`, `learned` (the FreezeAsGuard guard). `registry` holds the registry, the composite grammar (`A+B+C`, left to right) and
`protect`. Importing this package registers every protection.
"""

from __future__ import annotations

from . import basic, components, imma, immunise, importance, learned, nullspace, selection, uce  # noqa: F401  (registration)
from .registry import (
           PROTECTIONS,
           NoConfig,
           Protection,
           Release,
           ReleaseContext,
           config_dict,
           configs_for,
           describe,
           needs_ratio,
           protect,
           register,
           stages,
)

__all__ = ["PROTECTIONS", "NoConfig", "Protection", "Release", "ReleaseContext", "config_dict", "configs_for",
           "describe", "needs_ratio", "protect", "register", "stages"]
