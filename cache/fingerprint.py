"""Compare fingerprints (nested JSON dicts) and name every difference by its dotted key."""

from __future__ import annotations

from typing import Any


def differences(stored: Any, wanted: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(stored) | set(wanted)):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored:
                out.append(f"{where}: absent in the store, now {_short(wanted[key])}")
            elif key not in wanted:
                out.append(f"{where}: store has {_short(stored[key])}, now absent")
            else:
                out.extend(differences(stored[key], wanted[key], where))
        return out
    if _normal(stored) != _normal(wanted):
        return [f"{prefix}: store has {_short(stored)}, now {_short(wanted)}"]
    return []


def _normal(v: Any) -> Any:
    # JSON turns tuples into lists; compare them as equal.
    if isinstance(v, (list, tuple)):
        return [_normal(x) for x in v]
    return v


def _short(v: Any, limit: int = 120) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."
