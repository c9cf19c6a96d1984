"""The feature cache: a zarr v3 store of per-layer activations, its writer and its reader.

`cache` never imports `pipeline`: it knows arrays and manifests, not backbones or configs.
"""

from cache.background import BackgroundWriter
from cache.codecs import COMPRESSOR_LEVELS, COMPRESSORS
from cache.encodings import ENCODINGS, Encoding, encoding
from cache.errors import CannotWrite, ConfigError, FeatureCacheError, StoreError, StoreMismatchError, cannot_write, require_extra
from cache.fingerprint import differences
from cache.layout import ChunkPlan
from cache.local_files import pid_alive, replace_dir
from cache.location import is_url, option_problems
from cache.reader import Batch, CacheReader, open_store
from cache.schema import (
    FORMAT_VERSION,
    LAYER_ROLES,
    MANIFEST_KEY,
    TOKEN_ORDER,
    BackboneRecord,
    Fingerprint,
    LayerSpec,
    Manifest,
    StorageRecord,
    ViewsRecord,
    split_of,
    view_group,
)
from cache.summary import summarize
from cache.verify import verify_store
from cache.writer import StoreWriter, store_state

# Everything stage two, the runners and the CLI use: they import from `cache`, never its modules.
__all__ = [
    "BackgroundWriter", "Batch", "CacheReader", "CannotWrite", "ChunkPlan", "COMPRESSOR_LEVELS", "COMPRESSORS", "ConfigError", "ENCODINGS", "Encoding",
    "BackboneRecord", "FORMAT_VERSION", "FeatureCacheError", "Fingerprint", "LAYER_ROLES", "LayerSpec", "MANIFEST_KEY", "Manifest",
    "StorageRecord", "TOKEN_ORDER", "ViewsRecord", "split_of", "view_group", "StoreError", "StoreMismatchError",
    "StoreWriter", "cannot_write", "differences", "encoding", "is_url", "open_store", "option_problems", "pid_alive", "replace_dir",
    "require_extra", "store_state", "summarize", "verify_store",
]
