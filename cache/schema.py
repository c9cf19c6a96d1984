"""What a feature-cache store holds, as plain frozen dataclasses.

The store layout (zarr v3, readable by any v3 implementation):

    <root>/                      group; attrs["feature_cache"] = the manifest (see Manifest)
    <root>/<split>/              group, one per dataset split ("train", "val", ...)
    <root>/<split>/layers/<name> array [N, T, D]: tokens of one layer. Token order is the
                                 backbone's: prefix tokens first (CLS, registers), then patch /
                                 feature-map tokens in row-major (H, W) order.
    <root>/<split>/scales/<name> array [N, D] float16, only for int8 layers: per-sample,
                                 per-channel absmax / 127; value = int8 * scale.
    <root>/<split>/layers/kv.<i> optional (extract with backbone.cache_kv): array [N, T, 2D], the
                                 keys then values that ViT block i computes from its input
                                 tokens (its qkv projection without the query part, before any
                                 k_norm), so VQT need not recompute them every epoch.
    <root>/<split>/stats/<name>  array [n_chunks, 6, D] float64, one object per chunk: the sums of
                                 that chunk's valid samples (cache/stats.py: prefix, patch and pooled
                                 sums and sums of squares), for exact per-channel means and stds
    <root>/<split>/labels        array [N] int64
    <root>/<split>/valid         array [N] bool: False where the image could not be read
    <root>/<split>/sample_ids    array [total bytes] uint8: the sample ids' UTF-8 bytes, concatenated;
    <root>/<split>/sample_id_offsets  array [N + 1] int64: id i = sample_ids[off[i]:off[i + 1]]. An
                                 id is the file path relative to the split root, or "<split>:<index>"
                                 for array datasets (core v3 types: any implementation reads them)
    <root>/<split>/chunk_done    array [n_chunks] uint8, chunked one element per chunk so that
                                 every completion stamp is its own object: 1 once that chunk's
                                 samples are written in every array above.

Every array's codecs end with crc32c (cache/codecs.py); layer arrays are filled with NaN, and a
layer's values are stored as its storage dtype's encoding says (cache/encodings.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# 2: crc32c on every object, NaN-filled layers, sample ids as UTF-8 bytes + offsets.
# 3: per-chunk feature sums (stats/<layer>).
FORMAT_VERSION = 3
MANIFEST_KEY = "feature_cache"
# The root's only attribute while a store on an object store is being created (no rename
# there: see cache/writer.py); never present in a finished store.
CREATING_KEY = "feature_cache_creating"

# Layers named KV_PREFIX + block index hold keys/values, not features (see the layout above).
KV_PREFIX = "kv."


@dataclass(frozen=True)
class LayerSpec:
    """One cached layer, as stage two sees it.

    tokens/dim: the stored shape [T, D] per sample.
    prefix_tokens: how many of the T tokens are prefix (CLS/register) tokens; 0 for CNNs.
    grid: (H, W) of the patch/feature-map tokens that follow the prefix, None when pooled.
    block_index: for ViT blocks, the block whose *output* this is; -1 for the block-0 input
        (the embedded tokens, stored as layer "embed"); None for other modules.
    through_final_norm: the block output was stored after the backbone's final norm (as
        DINOv2's linear evaluation reads intermediate layers), not as the next block reads it.
    """

    name: str
    tokens: int
    dim: int
    prefix_tokens: int = 0
    grid: Optional[tuple[int, int]] = None
    block_index: Optional[int] = None
    through_final_norm: bool = False

    @property
    def is_kv(self) -> bool:
        """Keys/values cached for VQT, not features an adapter should read as tokens."""
        return self.name.startswith(KV_PREFIX)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "tokens": self.tokens,
            "dim": self.dim,
            "prefix_tokens": self.prefix_tokens,
            "grid": list(self.grid) if self.grid is not None else None,
            "block_index": self.block_index,
            # Named only when set, so stores made before the option keep their fingerprint.
            **({"through_final_norm": True} if self.through_final_norm else {}),
        }

    @classmethod
    def from_json(cls, d: dict) -> "LayerSpec":
        grid = d.get("grid")
        return cls(
            name=d["name"],
            tokens=int(d["tokens"]),
            dim=int(d["dim"]),
            prefix_tokens=int(d.get("prefix_tokens", 0)),
            grid=tuple(grid) if grid is not None else None,
            block_index=d.get("block_index"),
            through_final_norm=bool(d.get("through_final_norm", False)),
        )
