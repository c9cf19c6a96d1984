"""Stage two: lightweight adapters trained on cached backbone features.

Importing this package registers every adapter kind in `ADAPTERS`.
"""

from pipeline.adapters.base import Adapter
from pipeline.adapters.errors import AdapterConfigError
from pipeline.adapters.fused import FusedAdapters, per_member_cross_entropy
from pipeline.adapters.inca import InCA, InCAHparams
from pipeline.adapters.linear import LinearHparams, LinearProbe
from pipeline.adapters.losa import LoSA, LoSAHparams
from pipeline.adapters.persistence import (
    StoreMismatchError,
    load_adapter,
    read_adapter_manifest,
    save_adapter,
    saved_fingerprint,
)
from pipeline.adapters.registry import (
    ADAPTERS,
    BackboneModules,
    adapter_class,
    build_adapter,
    parse_hparams,
    register_adapter,
)
from pipeline.adapters.stacked_adamw import StackedAdamW
from pipeline.adapters.vqt import VQT, VQTHparams

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterConfigError",
    "BackboneModules",
    "FusedAdapters",
    "InCA",
    "InCAHparams",
    "LinearHparams",
    "LinearProbe",
    "LoSA",
    "LoSAHparams",
    "StackedAdamW",
    "StoreMismatchError",
    "VQT",
    "VQTHparams",
    "adapter_class",
    "build_adapter",
    "load_adapter",
    "parse_hparams",
    "per_member_cross_entropy",
    "read_adapter_manifest",
    "saved_fingerprint",
    "register_adapter",
    "save_adapter",
]
