"""Attacks: the user fine-tuning configurations a release is measured against.

- `config`: `AttackConfig`, an attack as data (torch-free);
- `registry`: the named attacks and the standard battery (`BATTERY`);
- `captions`: the caption policies (renamed, synonym) applied to training captions and prompts alike;
- `run`: checking an attack against a guard before any work, and running it through the guarded path.
"""

from .config import AttackConfig
from .registry import ATTACKS, BATTERY, DEFAULT, Attack, get_attack, register_attack

__all__ = ["ATTACKS", "BATTERY", "DEFAULT", "Attack", "AttackConfig", "get_attack", "register_attack"]
