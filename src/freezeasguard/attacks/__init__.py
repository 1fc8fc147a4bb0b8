"""Attacks: the user fine-tuning configurations a release is measured against.

- `config`: `AttackConfig`, an attack as data (torch-free);
- `registry`: the named attacks and the standard battery (`BATTERY`);
- `captions`: the caption policies (renamed, synonym) applied to training captions and prompts alike;
- `run`: checking an attack against a guard before any work, and running it through the guarded path;
- `textual_inversion`: the reference attack outside the path (a new word per concept, the UNet untouched);
- `redteam`: `freezeasguard attack`, red-teaming a release on the publisher's own images.
"""

from .config import AttackConfig
from .registry import ATTACKS, BATTERY, DEFAULT, REFERENCES, Attack, get_attack, register_attack

__all__ = ["ATTACKS", "BATTERY", "DEFAULT", "REFERENCES", "Attack", "AttackConfig", "get_attack", "register_attack"]
