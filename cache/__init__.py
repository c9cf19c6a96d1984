"""The feature cache: a zarr v3 store of per-layer activations, its writer and its reader.

`cache` never imports `pipeline`: it knows arrays and manifests, not backbones or configs.
"""

from cache.background import BackgroundWriter
from cache.errors import StoreError, StoreMismatchError
from cache.layout import ChunkPlan
from cache.reader import Batch, CacheReader, open_store
from cache.schema import FORMAT_VERSION, MANIFEST_KEY, STORAGE_DTYPES, TOKEN_REDUCTIONS, LayerSpec
from cache.writer import StoreWriter

__all__ = [
    "BackgroundWriter", "Batch", "CacheReader", "ChunkPlan", "FORMAT_VERSION", "LayerSpec",
    "MANIFEST_KEY", "STORAGE_DTYPES", "StoreError", "StoreMismatchError", "StoreWriter",
    "TOKEN_REDUCTIONS", "open_store",
]
