"""Compare fingerprints (nested JSON dicts) and name every difference by its dotted key.

One comparison for every fingerprint check: a store against the config asking for it
(cache.writer), an adapter against the store it is given (pipeline.adapters.persistence).
"""

from __future__ import annotations

from typing import Any

ABSENT = "<absent>"


def differences(stored: Any, wanted: Any, prefix: str = "", labels: tuple[str, str] = ("store has", "now")) -> list[str]:
    """One line per differing leaf, "dotted.key: <labels[0]> X, <labels[1]> Y"; [] when equal.

    labels name the two sides: ("store has", "now") for a store, ("saved", "given") for an adapter.
    """
    had, now = labels
    if isinstance(stored, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(stored) | set(wanted), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored:
                out.append(f"{where}: {had} {ABSENT}, {now} {_short(wanted[key])}")
            elif key not in wanted:
                out.append(f"{where}: {had} {_short(stored[key])}, {now} {ABSENT}")
            else:
                out.extend(differences(stored[key], wanted[key], where, labels))
        return out
    if _normal(stored) != _normal(wanted):
        return [f"{prefix}: {had} {_short(stored)}, {now} {_short(wanted)}"]
    return []


def _normal(v: Any) -> Any:
    # JSON turns tuples into lists and dict keys into strings; compare them as equal.
    if isinstance(v, (list, tuple)):
        return [_normal(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _normal(x) for k, x in v.items()}
    return v


def _short(v: Any, limit: int = 120) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."
