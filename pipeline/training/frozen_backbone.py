"""Rebuild the frozen backbone a store was made with (for VQT's blocks and for prediction).

One way, from the store's fingerprint alone: the backbone's name, weights and model_kwargs,
the resolved preprocessing, and the layer specs (keys/values cached, layers through the final
norm). The extract config saved beside it in the manifest is never read, so a config key
renamed since extraction does not break an old store. The weights' sha256 must match the
fingerprint's, so an adapter never meets blocks other than those that made its cache, and the
preprocessing is the recorded one, key by key, whatever this timm resolves for the model (a
timm whose default crop mode or interpolation changed would otherwise feed predict other
pixels than extraction read).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from cache import ConfigError, Fingerprint, StoreMismatchError
from pipeline.backbones.build import Backbone, build_backbone
from pipeline.backbones.taps import EMBED
from pipeline.config import build
from pipeline.config.extract_config import BackboneConfig, PreprocessConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Recorded:
    """The part of an extract config that a fingerprint records: what builds the backbone."""

    backbone: BackboneConfig
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)


def _recorded(fingerprint: Fingerprint, where: str) -> _Recorded:
    """The backbone and preprocessing configs a fingerprint records, validated as a config is
    (model_kwargs that would make timm load a file are refused here, one ConfigError)."""
    bb, dc, specs = fingerprint.backbone, fingerprint.preprocessing, fingerprint.layers
    kwargs = dict(bb.model_kwargs)
    # Stores made before model_kwargs.img_size was refused may record it: the image size
    # (preprocess.image_size) builds the same model where the two agree.
    if kwargs.get("img_size") in (dc["input_size"][1], list(dc["input_size"][1:]), tuple(dc["input_size"][1:])):
        del kwargs["img_size"]
    return build(_Recorded, {
        "backbone": {"name": bb.name, "weights": bb.weights, "model_kwargs": kwargs,
                     "layers": [s.name for s in specs if s.name != EMBED and s.holds_features] or [-1],
                     "cache_kv": any(not s.holds_features for s in specs), "through_final_norm": any(s.through_final_norm for s in specs)},
        "preprocess": {"image_size": dc["input_size"][1], "interpolation": dc["interpolation"], "mean": dc["mean"],
                       "std": dc["std"], "crop_pct": dc["crop_pct"]},
    }, source=f"the backbone fingerprint of {where}")


def rebuild_backbone(fingerprint: Fingerprint, where: str) -> Backbone:
    """The backbone of `fingerprint` (a store's, or the one an adapter saved), refused unless
    its weights hash to the fingerprint's. where: whose fingerprint it is, for messages
    (e.g. "store 'runs/x.zarr'")."""
    cfg = _recorded(fingerprint, where)
    try:
        backbone = build_backbone(cfg.backbone, cfg.preprocess)
    except ConfigError as e:  # e.g. a weights file given by a relative path, from another working directory
        relative = cfg.backbone.weights.endswith((".safetensors", ".pt", ".pth")) and not cfg.backbone.weights.startswith("/")
        hint = " (a relative weights path is read from the working directory)" if relative else ""
        raise ConfigError(f"{where}: its backbone cannot be rebuilt: {e}{hint}") from None
    want = fingerprint.backbone.weights_sha256
    if backbone.weights_sha256 != want:
        raise StoreMismatchError(
            where,
            [f"backbone.weights_sha256: made with {want[:16]}..., the weights {cfg.backbone.weights!r} now give {backbone.weights_sha256[:16]}..."],
            "The weights source changed since extraction; re-extract or restore the weights.",
            subject=f"{where} was made with other weights",
        )
    backbone.data_config = _recorded_preprocessing(backbone.data_config, fingerprint.preprocessing, where)
    return backbone


def _recorded_preprocessing(resolved: dict, recorded: dict, where: str) -> dict:
    """The data config extraction used (as JSON: lists for tuples), in the types timm resolves;
    refused when it records a key this timm does not resolve (its transform cannot be rebuilt)."""
    unknown = sorted(set(recorded) - set(resolved))
    if unknown:
        raise StoreMismatchError(
            where, [f"preprocessing.{k}: recorded {recorded[k]!r}, which this timm's data config does not have" for k in unknown],
            "Install the timm version that extracted the store, or re-extract.",
            subject=f"{where} records preprocessing this timm cannot reproduce",
        )
    config = dict(resolved)
    for key, value in recorded.items():
        value = tuple(value) if isinstance(value, list) else value
        if value != config[key]:
            log.info("%s: preprocessing.%s is %r as recorded (this timm resolves %r)", where, key, value, config[key])
        config[key] = value
    return config
