"""What a feature-cache store holds, as plain frozen dataclasses.

The store layout (zarr v3, readable by any v3 implementation):

    <root>/                      group; attrs["feature_cache"] = the manifest (Manifest.to_json)
    <root>/<split>/              group, one per dataset split ("train", "val", ...)
    <root>/<split>/layers/<name> array [N, T, D]: tokens of one layer. Token order is the
                                 backbone's: prefix tokens first (CLS, registers), then patch /
                                 feature-map tokens in row-major (H, W) order.
    <root>/<split>/scales/<name> array [N, D] float16, only for int8 layers: per-sample,
                                 per-channel absmax / 127; value = int8 * scale.
                                 A layer's role (LayerSpec.role) says what it holds: "features"
                                 (tokens an adapter reads), or "keys_values" ([N, T, 2D], the
                                 keys then values that ViT block `block_index` computes from its
                                 input tokens: its qkv projection without the query part, before
                                 any k_norm; extract with backbone.cache_kv, for VQT).
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
    <root>/<split>/views/<v>/    optional (extract with store.views = K > 1), v = 1 .. K-1, for the
                                 one augmented split (Fingerprint.views): group with the layers/,
                                 scales/, stats/, valid and chunk_done arrays of augmented view v
                                 of every sample, chunked exactly as the split's (its labels and
                                 ids are the split's). The split's own arrays are view 0: clean.
                                 View v of sample i has its own chunk, so a reader that draws one
                                 view per chunk reads one object per chunk, as without views.

Every array's codecs end with crc32c (cache/codecs.py); layer arrays are filled with NaN, and a
layer's values are stored as its storage dtype's encoding says (cache/encodings.py).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal, Optional

from cache.errors import StoreError
from cache.fingerprint import differences
from cache.layout import ChunkPlan

# 2: crc32c on every object, NaN-filled layers, sample ids as UTF-8 bytes + offsets.
# 3: per-chunk feature sums (stats/<layer>).
# 4: a role per layer (keys/values are a role, not a name prefix); the typed manifest below;
#    augmented views of one split.
FORMAT_VERSION = 4
MANIFEST_KEY = "feature_cache"
# The root's only attribute while a store on an object store is being created (no rename
# there: see cache/writer.py); never present in a finished store.
CREATING_KEY = "feature_cache_creating"
TOKEN_ORDER = "prefix tokens (CLS, registers) first, then patch/feature-map tokens in row-major (H, W) order"

LayerRole = Literal["features", "keys_values"]
LAYER_ROLES: tuple[str, ...] = LayerRole.__args__


@dataclass(frozen=True)
class LayerSpec:
    """One cached layer, as stage two sees it.

    tokens/dim: the stored shape [T, D] per sample.
    prefix_tokens: how many of the T tokens are prefix (CLS/register) tokens; 0 for CNNs.
    grid: (H, W) of the patch/feature-map tokens that follow the prefix, None when pooled.
    block_index: for ViT blocks, the block whose *output* this is (for keys_values, the block
        whose attention computes them); -1 for the block-0 input (the embedded tokens, stored
        as layer "embed"); None for other modules.
    through_final_norm: the block output was stored after the backbone's final norm (as
        DINOv2's linear evaluation reads intermediate layers), not as the next block reads it.
    role: what the array holds (see the layout above); adapters read only "features" as tokens.
    registers_only: the prefix tokens are registers, none a CLS token (a ViT built without a
        class token, e.g. timm's *_reg4_gap); token 0 then is no summary of the image.
    """

    name: str
    tokens: int
    dim: int
    prefix_tokens: int = 0
    grid: Optional[tuple[int, int]] = None
    block_index: Optional[int] = None
    through_final_norm: bool = False
    role: LayerRole = "features"
    registers_only: bool = False

    @property
    def holds_features(self) -> bool:
        return self.role == "features"

    @property
    def has_class_token(self) -> bool:
        """Token 0 is a CLS token (what `cls` pooling and readouts read)."""
        return self.prefix_tokens > 0 and not self.registers_only

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "tokens": self.tokens,
            "dim": self.dim,
            "prefix_tokens": self.prefix_tokens,
            "grid": list(self.grid) if self.grid is not None else None,
            "block_index": self.block_index,
            # Named only when set, so a layer's description stays as short as it can be.
            **({"through_final_norm": True} if self.through_final_norm else {}),
            "role": self.role,
            **({"registers_only": True} if self.registers_only else {}),
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
            role=d.get("role", "features"),
            registers_only=bool(d.get("registers_only", False)),
        )


@dataclass(frozen=True)
class BackboneRecord:
    """The frozen backbone that made the values: its timm name, where its weights came from,
    their sha256, and the timm model kwargs."""

    name: str
    weights: str
    weights_sha256: str
    model_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StorageRecord:
    """How values are stored: the dtype (cache/encodings.py), the token reduction and, for the
    reductions that pool the patch grid, the pooled grid's side."""

    dtype: str
    tokens: str
    grid_size: Optional[int] = None


@dataclass(frozen=True)
class ViewsRecord:
    """Augmented views of one split: `count` views per sample (view 0 clean, 1 .. count-1
    augmented), made as `augmentation` says (the pipeline's description of its transform and
    seeds; the cache only stores it)."""

    split: str
    count: int
    augmentation: dict


def view_group(split: str, view: int) -> str:
    """The group that holds view `view` of `split`: the split's own for view 0 (clean)."""
    return split if view == 0 else f"{split}/views/{view}"


def split_of(group: str) -> str:
    """The split a group belongs to ("train/views/3" -> "train")."""
    return group.split("/", 1)[0]


@dataclass(frozen=True)
class Fingerprint:
    """Everything that decides a store's values and layout; a store refuses any change.

    preprocessing: the backbone's resolved timm data config (input_size, mean, std, ...).
    dataset: the data source's own description (kind, and per split what identifies its samples).
    layout: samples_per_chunk, chunks_per_shard and the compressor [name, level].
    views: the augmented views of one split; None when every split is stored clean only.
    compute: how the forward ran: {"device": "cpu" | "cuda" | ..., "autocast": "bfloat16" |
        "float16" | None}; bf16 autocast moves features by far more than the store's float16
        rounding, so rows of one store never mix precisions. None in stores made before it.
    """

    backbone: BackboneRecord
    layers: tuple[LayerSpec, ...]
    storage: StorageRecord
    preprocessing: dict
    dataset: dict
    layout: dict
    views: Optional[ViewsRecord] = None
    compute: Optional[dict] = None

    def view_count(self, split: str) -> int:
        return self.views.count if self.views is not None and self.views.split == split else 1

    def to_json(self) -> dict:
        return {
            "backbone": dataclasses.asdict(self.backbone),
            "layers": [s.to_json() for s in self.layers],
            "storage": dataclasses.asdict(self.storage),
            "preprocessing": self.preprocessing,
            "dataset": self.dataset,
            "layout": self.layout,
            **({"views": dataclasses.asdict(self.views)} if self.views is not None else {}),
            **({"compute": self.compute} if self.compute is not None else {}),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Fingerprint":
        return cls(
            backbone=BackboneRecord(**d["backbone"]),
            layers=tuple(LayerSpec.from_json(x) for x in d["layers"]),
            storage=StorageRecord(**d["storage"]),
            preprocessing=d["preprocessing"],
            dataset=d.get("dataset", {}),
            layout=d.get("layout", {}),
            views=ViewsRecord(**d["views"]) if d.get("views") else None,
            compute=d.get("compute"),
        )

    def differences(self, other: "Fingerprint", labels: tuple[str, str] = ("store has", "now")) -> list[str]:
        """Every difference from `other`, one line per dotted key (cache/fingerprint.py)."""
        return differences(self.to_json(), other.to_json(), labels=labels)


@dataclass(frozen=True)
class SplitRecord:
    num_samples: int
    n_chunks: int


@dataclass(frozen=True)
class Manifest:
    """The root group's `feature_cache` attribute: the fingerprint, and what a run recorded.

    Written by cache/writer.py and read by cache/reader.py, nowhere else. Its JSON also repeats
    the layers, chunking and storage at the top level, for readers that do not know this code.
    classes: class names, by label. ignored: per split, the paths under its folder that are not
    samples. skipped: per split, the ids of samples that could not be read (valid False).
    config: the resolved extract config, for people; no code reads it back.
    code_version: the version of the code that computes features (a hash the extract runner
        gives, pipeline/code_version.py): a resume with other code is refused, so no store
        holds chunks of two versions. None in stores made before it.
    creation_id: random, given when the store is created: a dask worker writing for a driver
        that has died stamps nothing into a store made since at the same path (by an
        --overwrite). None in stores made before it.
    """

    fingerprint: Fingerprint
    splits: dict[str, SplitRecord]
    created_at: str = field(default_factory=lambda: _now())
    classes: tuple[str, ...] = ()
    backbone_parameters: Optional[int] = None
    ignored: dict[str, list[str]] = field(default_factory=dict)
    package_version: Optional[str] = None
    code_version: Optional[str] = None
    config: dict = field(default_factory=dict)
    complete: bool = False
    completed_at: Optional[str] = None
    skipped: dict[str, list[str]] = field(default_factory=dict)
    creation_id: Optional[str] = field(default_factory=lambda: uuid.uuid4().hex)
    format_version: int = FORMAT_VERSION

    @property
    def layers(self) -> dict[str, LayerSpec]:
        return {s.name: s for s in self.fingerprint.layers}

    @property
    def plan(self) -> ChunkPlan:
        layout = self.fingerprint.layout
        return ChunkPlan(layout["samples_per_chunk"], layout["chunks_per_shard"])

    @property
    def dtype(self) -> str:
        return self.fingerprint.storage.dtype

    @property
    def groups(self) -> list[str]:
        """Every group that is written chunk by chunk: each split, then its augmented views."""
        return [view_group(s, v) for s in self.splits for v in range(self.fingerprint.view_count(s))]

    def record(self, group: str) -> SplitRecord:
        """The sample count and chunks of a split or of one of its views."""
        return self.splits[split_of(group)]

    def completed(self, skipped: dict[str, list[str]]) -> "Manifest":
        return dataclasses.replace(self, complete=True, skipped=skipped, completed_at=_now())

    def reopened(self) -> "Manifest":
        """Marked incomplete again (verify --repair unstamped some chunks)."""
        return dataclasses.replace(self, complete=False, completed_at=None)

    def to_json(self) -> dict:
        plan = self.plan
        return {
            "format_version": self.format_version,
            "fingerprint": self.fingerprint.to_json(),
            "layers": [s.to_json() for s in self.fingerprint.layers],
            "splits": {k: dataclasses.asdict(v) for k, v in self.splits.items()},
            "samples_per_chunk": plan.samples_per_chunk,
            "chunks_per_shard": plan.chunks_per_shard,
            "storage": dataclasses.asdict(self.fingerprint.storage),
            "token_order": TOKEN_ORDER,
            "classes": list(self.classes),
            "backbone_parameters": self.backbone_parameters,
            "ignored": self.ignored,
            "package_version": self.package_version,
            **({"code_version": self.code_version} if self.code_version else {}),
            "config": self.config,
            "created_at": self.created_at,
            "complete": self.complete,
            **({"completed_at": self.completed_at} if self.completed_at else {}),
            "skipped": self.skipped,
            **({"creation_id": self.creation_id} if self.creation_id else {}),
        }

    @classmethod
    def from_json(cls, d: dict, where: str) -> "Manifest":
        """where: the store's path, for the error that refuses another format version."""
        if d.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{where!r} has format version {d.get('format_version')}, this code reads {FORMAT_VERSION} "
                             "(checksummed objects, per-chunk feature statistics, layer roles); extract it again with --overwrite")
        return cls(
            fingerprint=Fingerprint.from_json(d["fingerprint"]),
            splits={k: SplitRecord(int(v["num_samples"]), int(v["n_chunks"])) for k, v in d["splits"].items()},
            created_at=d["created_at"],
            classes=tuple(d.get("classes", ())),
            backbone_parameters=d.get("backbone_parameters"),
            ignored=d.get("ignored", {}),
            package_version=d.get("package_version"),
            code_version=d.get("code_version"),
            config=d.get("config", {}),
            complete=bool(d.get("complete")),
            completed_at=d.get("completed_at"),
            skipped=d.get("skipped", {}),
            creation_id=d.get("creation_id"),
        )


def store_differences(manifest_json: dict, wanted: Fingerprint) -> list[str]:
    """What differs between a store's manifest (its JSON, any version) and the wanted fingerprint."""
    diff = []
    if manifest_json.get("format_version") != FORMAT_VERSION:
        diff.append(f"format_version: store has {manifest_json.get('format_version')}, this code writes {FORMAT_VERSION}")
    wanted_json = wanted.to_json()
    return diff + [_with_coverage(line, wanted_json) for line in differences(manifest_json.get("fingerprint", {}), wanted_json)]


def _with_coverage(line: str, wanted_json: dict) -> str:
    """A split's samples_sha256 line, with what that hash covers (for image files: their size
    and mtime, so copies that did not keep their times differ too); a split's classes line,
    with what decides them; other lines as they are."""
    key = line.split(":", 1)[0].split(".")
    if len(key) == 4 and key[:2] == ["dataset", "splits"] and key[3] == "classes":
        return (f"{line} (class names come from data.classes, else from the data, else \"0\"..\"max\": where the data is the "
                "same, give data.classes the store's names rather than --overwrite)")
    if len(key) != 4 or key[:2] != ["dataset", "splits"] or key[3] != "samples_sha256":
        return line
    content = wanted_json.get("dataset", {}).get("splits", {}).get(key[2], {}).get("content")
    return f"{line} (it covers: {content})" if content else line


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
