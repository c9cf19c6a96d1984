"""Rebuild the frozen backbone a store was made with (for VQT's blocks and for prediction).

The store's manifest holds the resolved extract config; the weights' sha256 must match the
store's fingerprint, so an adapter never meets blocks other than those that made its cache.
"""

from __future__ import annotations

from cache.errors import StoreMismatchError
from pipeline.backbones.build import Backbone, build_backbone
from pipeline.config import ExtractConfig, build


def extract_config_of(manifest: dict) -> ExtractConfig:
    return build(ExtractConfig, manifest["config"], source="the store's saved config")


def backbone_of(manifest: dict, store: str = "store") -> Backbone:
    cfg = extract_config_of(manifest)
    return verified_backbone(cfg, manifest["fingerprint"]["backbone"], store)


def verified_backbone(cfg: ExtractConfig, fingerprint_backbone: dict, where: str) -> Backbone:
    """Build the backbone of `cfg` and refuse it unless its weights hash to the fingerprint's."""
    backbone = build_backbone(cfg.backbone, cfg.preprocess)
    want = fingerprint_backbone["weights_sha256"]
    if backbone.weights_sha256 != want:
        raise StoreMismatchError(
            where,
            [f"backbone.weights_sha256: made with {want[:16]}..., the weights {cfg.backbone.weights!r} now give {backbone.weights_sha256[:16]}..."],
            "The weights source changed since extraction; re-extract or restore the weights.",
        )
    return backbone
