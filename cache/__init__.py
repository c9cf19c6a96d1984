"""The feature cache: a zarr v3 store of per-layer activations, its writer and its reader.

`cache` never imports `pipeline`: it knows arrays and manifests, not backbones or configs.
"""

from cache.background import BackgroundWriter
from cache.codecs import COMPRESSORS
from cache.encodings import ENCODINGS, Encoding, encoding
from cache.errors import ConfigError, FeatureCacheError, StoreError, StoreMismatchError
from cache.layout import ChunkPlan
from cache.reader import Batch, CacheReader, open_store
from cache.schema import FORMAT_VERSION, MANIFEST_KEY, LayerSpec
from cache.writer import StoreWriter

__all__ = [
    "BackgroundWriter", "Batch", "CacheReader", "ChunkPlan", "COMPRESSORS", "ConfigError", "ENCODINGS", "Encoding",
    "FORMAT_VERSION", "FeatureCacheError", "LayerSpec",
    "MANIFEST_KEY", "StoreError", "StoreMismatchError", "StoreWriter",
    "encoding", "open_store",
]
