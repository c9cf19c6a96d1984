"""What each storage option costs on disk, and in accuracy.

A variant store holds the same images through the same backbone with other storage
settings (dtype, token reduction); its path is the case's store path with the overrides
in its name. Disk per sample is measured from the files; the accuracy cost is the chosen
linear and InCA configurations retrained on the variant, per seed.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cache import encoding, summarize
from pipeline.config import ExtractConfig, apply_overrides, build, to_dict


def option_label(overrides: tuple[str, ...]) -> str:
    return ", ".join(o.removeprefix("store.") for o in overrides) or "as extracted"


def variant_config(cfg: ExtractConfig, overrides: tuple[str, ...]) -> ExtractConfig:
    slug = "_".join(o.removeprefix("store.").replace("=", "-") for o in overrides)
    variant = build(ExtractConfig, apply_overrides(to_dict(cfg), list(overrides)), source=f"storage option {list(overrides)}")
    path = Path(cfg.store.path)
    return replace(variant, store=replace(variant.store, path=str(path.with_name(f"{path.stem}.{slug}{path.suffix}"))))


def disk_per_sample(store: str) -> dict:
    """KB per sample on disk (compressed, every layer) and before compression."""
    summary = summarize(store)
    dtype = summary["storage"]["dtype"]
    samples = sum(d["num_samples"] for d in summary["splits"].values())
    raw = sum(encoding(dtype).bytes_per_sample(layer["tokens"], layer["dim"]) for layer in summary["layers"])  # scales included
    layers_on_disk = sum(l["bytes_on_disk"] for l in summary["layers"])
    return {"samples": samples, "kb_on_disk": layers_on_disk / samples / 1e3, "kb_raw": raw / 1e3,
            "dtype": dtype, "tokens": summary["storage"]["tokens"], "layer_shapes": {l["name"]: [l["tokens"], l["dim"]] for l in summary["layers"]}}
