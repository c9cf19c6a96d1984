"""Saving and loading trained adapters, tied to the feature store they were trained on.

A saved adapter is a directory with two files:

    adapter.safetensors   the adapter's state_dict: its trainable state only (borrowed frozen
                          backbone modules are outside the module tree, see base.py), and the
                          fixed standardisation of its inputs if it has one ("standardize.*")
    adapter.json          {"format_version", "kind", "num_classes", "hparams",
                           "layers": [LayerSpec.to_json(), ...], "store_fingerprint",
                           "class_names"}

Features from another store (another backbone, resolution, dtype, ...) would make the weights
meaningless without any shape error, so loading compares the saved store fingerprint with the
caller's and refuses on any difference.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cache import FeatureCacheError, Fingerprint, LayerSpec, StoreMismatchError
from pipeline.adapters.base import Adapter
from pipeline.adapters.registry import BackboneModules, build_adapter
from pipeline.adapters.standardize import Standardizer

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter.safetensors"
MANIFEST_FILE = "adapter.json"
# 2: standardisation saved with the weights; VQT's normalisation and dropout hyperparameters.
FORMAT_VERSION = 2


def save_adapter(
    adapter: Adapter,
    directory: str | os.PathLike,
    store_fingerprint: Fingerprint,
    class_names: Sequence[str] | None = None,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in adapter.state_dict().items()}
    if adapter.standardizer is not None:
        state.update({name: t.detach().cpu().contiguous() for name, t in adapter.standardizer.state().items()})
    save_file(state, str(directory / WEIGHTS_FILE))
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": adapter.kind,
        "num_classes": adapter.num_classes,
        "hparams": dataclasses.asdict(adapter.hparams),
        "layers": [spec.to_json() for spec in adapter.layer_specs.values()],
        "store_fingerprint": store_fingerprint.to_json(),
        "class_names": list(class_names) if class_names is not None else None,
    }
    # The manifest is written last and atomically: a directory with a readable manifest
    # always has its weights, even if the job was killed mid-save.
    partial = directory / (MANIFEST_FILE + ".partial")
    partial.write_text(json.dumps(manifest, indent=2))
    os.replace(partial, directory / MANIFEST_FILE)
    logger.debug("saved %s adapter (%d tensors) to %s", adapter.kind, len(state), directory)
    return directory


MANIFEST_KEYS = ("format_version", "kind", "num_classes", "hparams", "layers", "store_fingerprint", "class_names")
AGAIN = "copy the adapter folder again, or train it again"


def read_adapter_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest, its store fingerprint readable; a damaged one is one line naming it (a
    truncated file was a raw JSONDecodeError, a field missing a KeyError)."""
    path = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise FeatureCacheError(f"{path}: not a readable adapter manifest ({e}); {AGAIN}") from None
    missing = [k for k in MANIFEST_KEYS if k not in manifest] if isinstance(manifest, dict) else list(MANIFEST_KEYS)
    if missing:
        raise FeatureCacheError(f"{path}: the adapter manifest lacks {missing}; {AGAIN}")
    try:
        saved_fingerprint(manifest)
    except (KeyError, TypeError, ValueError) as e:
        raise FeatureCacheError(f"{path}: its store_fingerprint is damaged ({type(e).__name__}: {e}); {AGAIN}") from None
    return manifest


def load_adapter(
    directory: str | os.PathLike,
    store_fingerprint: Fingerprint,
    backbone_modules: BackboneModules | Mapping[str, nn.Module] | None = None,
) -> Adapter:
    """Rebuild a saved adapter on CPU; refuses when it was trained on another store."""
    manifest = read_adapter_manifest(directory)
    if manifest["format_version"] != FORMAT_VERSION:
        raise FeatureCacheError(
            f"{directory}: adapter format_version {manifest['format_version']}, "
            f"this code reads {FORMAT_VERSION}; train it again"
        )
    _check_fingerprint(directory, saved_fingerprint(manifest), store_fingerprint)
    layers = {d["name"]: LayerSpec.from_json(d) for d in manifest["layers"]}
    adapter = build_adapter(
        manifest["kind"],
        layers,
        manifest["num_classes"],
        backbone_modules=backbone_modules,
        **manifest["hparams"],
    )
    weights = Path(directory) / WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as e:  # missing, truncated, not safetensors
        raise FeatureCacheError(f"{weights}: the adapter's weights cannot be read ({e}); {AGAIN}") from None
    own, standardizer = Standardizer.split_state(state)
    try:
        adapter.load_state_dict(own)
    except RuntimeError as e:  # missing or unexpected tensors, other shapes: another adapter's weights
        first = str(e).strip().splitlines()
        raise FeatureCacheError(f"{weights}: the weights do not fit the adapter {MANIFEST_FILE} describes "
                                f"({' '.join(line.strip() for line in first[:3])}); {AGAIN}") from None
    adapter.standardize_with(standardizer)
    return adapter


def saved_fingerprint(manifest: dict[str, Any]) -> Fingerprint:
    """The fingerprint of the store an adapter was trained on, from its adapter.json."""
    return Fingerprint.from_json(manifest["store_fingerprint"])


def _check_fingerprint(directory: str | os.PathLike, saved: Fingerprint, given: Fingerprint) -> None:
    differing = saved.differences(given, labels=("saved", "given"))
    if differing:
        raise StoreMismatchError(
            str(directory), differing, subject=f"adapter in {directory} was trained on a different feature store"
        )
