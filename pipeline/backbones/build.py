"""Create the frozen backbone: timm model + weights + preprocessing resolved from timm's data config."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass

import timm
import torch
from timm.data import create_transform, resolve_model_data_config

from pipeline.backbones.weights import SPECIAL, load_weights, state_dict_sha256, wants_timm_pretrained
from pipeline.config.extract_config import BackboneConfig, PreprocessConfig, model_kwargs_problems
from pipeline.config.loader import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Backbone:
    model: torch.nn.Module
    name: str
    weights: str
    weights_sha256: str
    data_config: dict  # timm's: input_size, interpolation, mean, std, crop_pct, crop_mode

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.data_config["input_size"][1:])

    def transform(self):
        return create_transform(**self.data_config, is_training=False)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build_backbone(cfg: BackboneConfig, pre: PreprocessConfig) -> Backbone:
    model = _create(cfg, pre)
    if cfg.weights not in SPECIAL:
        # Every tensor must fit but the classifier's, which is dropped here: features never use it.
        load_weights(model, cfg.name, cfg.weights)
    model.reset_classifier(0)
    model.eval().requires_grad_(False)
    data_config = _apply_overrides(resolve_model_data_config(model), pre)
    digest = state_dict_sha256(model)
    log.info(
        "backbone %s (%s weights, sha256 %s..., %.1fM params)",
        cfg.name, cfg.weights, digest[:12], sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return Backbone(model, cfg.name, cfg.weights, digest, data_config)


def _create(cfg: BackboneConfig, pre: PreprocessConfig) -> torch.nn.Module:
    if cfg.name not in timm.list_models(pretrained=False) and not timm.is_model(cfg.name):
        near = difflib.get_close_matches(cfg.name, timm.list_models(), n=3)
        raise ConfigError(f"backbone.name: {cfg.name!r} is not a timm model" + (f"; did you mean {near}?" if near else ""))
    # Checked again here: a config rebuilt from a store's or an adapter's fingerprint,
    # or made in code, reaches timm only with arguments that cannot load or fetch files.
    problems = model_kwargs_problems(cfg.model_kwargs, "backbone.model_kwargs")
    if problems:
        raise ConfigError(problems, f"the model_kwargs of backbone {cfg.name!r}")
    kwargs = dict(cfg.model_kwargs)
    pretrained = wants_timm_pretrained(cfg.weights)
    # "none" means random weights; seed them so that a rerun (resume) builds the same model.
    torch.manual_seed(0)
    try:
        if pre.image_size is not None:
            # ViTs size their position embedding at creation (timm resamples pretrained ones);
            # CNNs take any size and reject the argument.
            try:
                return timm.create_model(cfg.name, pretrained=pretrained, img_size=pre.image_size, **kwargs)
            except TypeError as e:
                if "img_size" not in str(e):
                    raise
        return timm.create_model(cfg.name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, ArithmeticError, AssertionError) as e:
        if not kwargs:  # nothing of the user's reached the model's constructor: a bug, with its traceback
            raise
        raise ConfigError(f"backbone.model_kwargs: timm cannot build {cfg.name!r} with {kwargs}: {type(e).__name__}: {e}") from e


def _apply_overrides(dc: dict, pre: PreprocessConfig) -> dict:
    dc = dict(dc)
    if pre.image_size is not None:
        dc["input_size"] = (3, pre.image_size, pre.image_size)
    for key in ("interpolation", "mean", "std", "crop_pct"):
        value = getattr(pre, key)
        if value is not None:
            dc[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return dc
