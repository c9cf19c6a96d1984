"""The `extract` job's config: YAML sections -> frozen dataclasses.

Only fields that change what is stored enter the store's fingerprint (see `fingerprint` in
pipeline/runners/extract.py); batch size, workers and device do not.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from cache import COMPRESSOR_LEVELS, COMPRESSORS, ENCODINGS, is_url, option_problems
from pipeline.backbones.tokens import TOKEN_REDUCTIONS
from pipeline.config.loader import PathText
from pipeline.data import DATA_SOURCES, KIND_KEYS
from pipeline.data.augment import AugmentPolicy

# The choices of these keys are the names in their registries, read once at import.
DataKind = Literal[tuple(DATA_SOURCES)]  # pipeline/data/__init__.py
StoreDtype = Literal[tuple(ENCODINGS)]  # cache/encodings.py
StoreTokens = Literal[tuple(TOKEN_REDUCTIONS)]  # pipeline/backbones/tokens.py
CompressorName = Literal[tuple(COMPRESSORS)]  # cache/codecs.py

# The timm.create_model arguments a config may give: ones that only choose the architecture
# (timm passes them to the model's constructor, which refuses those it does not take). Others,
# such as pretrained_cfg, pretrained_cfg_overlay, checkpoint_path, cache_dir or
# pretrained_strict, make timm load or fetch files; the backbone is rebuilt from a store's
# or an adapter's fingerprint, which must never do that, so they are refused.
MODEL_KWARGS = (
    "in_chans", "num_classes", "global_pool", "patch_size", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "qkv_bias", "qk_norm", "init_values", "class_token", "reg_tokens", "no_embed_class",
    "pos_embed", "pre_norm", "final_norm", "fc_norm", "dynamic_img_size", "dynamic_img_pad", "act_layer",
    "norm_layer", "output_stride", "channel_multiplier", "depth_multiplier", "drop_rate", "pos_drop_rate",
    "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "drop_block_rate",
)


def model_kwargs_problems(model_kwargs: dict, where: str = "model_kwargs") -> list[str]:
    """One problem per argument outside MODEL_KWARGS, naming it and listing the allowed ones."""
    out = []
    for key in model_kwargs:
        if key == "img_size":  # a model built at one size and fed another would record the wrong token layout
            out.append(f"{where}.img_size: got {model_kwargs[key]!r}; set preprocess.image_size instead, which sizes both the "
                       "model and the images it is fed")
        elif key not in MODEL_KWARGS:
            near = difflib.get_close_matches(str(key), MODEL_KWARGS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            out.append(f"{where}.{key}: got {model_kwargs[key]!r}, but only timm.create_model arguments that choose the "
                       f"architecture are taken (none that loads or fetches files){hint}; allowed: {list(MODEL_KWARGS)}")
    return out


@dataclass(frozen=True)
class BackboneConfig:
    name: str
    # "timm" (timm's own pretrained=True, from the hub), "none" (random init, for tests), the
    # name of an offline source (see pipeline.backbones.weights), or a path to a local
    # .safetensors / .pt / .pth state dict.
    weights: PathText = "timm"
    # Block/stage indices (negative allowed; timm's forward_intermediates numbering) or
    # module names (captured with forward hooks), e.g. [-1, -4, "blocks.2.attn"].
    layers: tuple[Union[int, str], ...] = (-1,)
    # ViTs: also store the block-0 input (embedded tokens) as layer "embed", so that stage
    # two can run VQT on every block.
    block_input: bool = True
    # ViTs: also store each block's keys/values of its input tokens (layers "kv.<i>", 2x the
    # width of a block's tokens), so stage-two VQT skips their projection every epoch.
    cache_kv: bool = False
    # ViTs: store block outputs through the backbone's final norm, as DINOv2's linear
    # evaluation reads intermediate layers (get_intermediate_layers(norm=True)). Part of the
    # fingerprint (each layer's spec records it). VQT cannot use such a store: its blocks read
    # the block outputs before any norm.
    through_final_norm: bool = False
    # Passed to timm.create_model (e.g. {drop_path_rate: 0.0}); only MODEL_KWARGS; img_size is
    # set from preprocess.
    model_kwargs: dict[str, Union[int, float, str, bool]] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        if not self.name:
            out.append("name: got '', expected a timm model name")
        if not self.layers:
            out.append("layers: got [], expected at least one layer index or module name")
        return out + model_kwargs_problems(self.model_kwargs)


@dataclass(frozen=True)
class DataConfig:
    kind: DataKind
    # image_folder: directory with SPLIT/CLASS/*.jpg; npz: directory with SPLIT.npz
    # (arrays "images" [N,H,W(,C)] uint8 and "labels" [N]); idx: directory with MNIST-style
    # *-images-idx3-ubyte(.gz) files; torchvision: download/cache root.
    root: PathText
    splits: tuple[str, ...] = ("train", "val")
    # idx files are named by prefix ("train", "t10k"): map split name -> file prefix.
    split_files: dict[str, PathText] = field(default_factory=dict)
    # torchvision dataset class name, e.g. "CIFAR10", and whether it may download.
    name: Optional[str] = None
    download: bool = False
    # Take only the first N samples of each split (per split with a mapping); null = all.
    # The subset is a deterministic stratified prefix, part of the fingerprint.
    limit: Union[int, dict[str, int], None] = None
    # A corrupt/unreadable image: "fail" stops with the file's path; "skip" marks the sample
    # invalid (valid=False; its label stays its true class), counts it and lists it in the manifest.
    on_corrupt: Literal["fail", "skip"] = "fail"
    # webdataset: per split, its tar shards (a brace pattern or a list; relative to root unless
    # absolute or a URL), the image members (webdataset's "jpg;png" alternatives) and the label member.
    shards: dict[str, Union[PathText, tuple[PathText, ...]]] = field(default_factory=dict)
    image_key: str = "jpg;jpeg;png;webp"
    label_key: str = "cls"
    # huggingface: the image and label columns; streaming: load_dataset(..., streaming=True).
    image_column: str = "image"
    label_column: str = "label"
    streaming: bool = False
    # Class names by label (null: the dataset's own names where it has them, else "0".."max"); where
    # the data names its classes (a ClassLabel, an npz `classes` array, torchvision's), they must
    # be exactly those. image_folder: the class folders name them.
    classes: Optional[tuple[str, ...]] = None
    # webdataset shards at URLs: passed to fsspec (cache.location.SAFE_OPTIONS only, as for stores).
    storage_options: dict[str, Any] = field(default_factory=dict)

    def limit_for(self, split: str) -> Optional[int]:
        if isinstance(self.limit, dict):
            return self.limit.get(split)
        return self.limit

    def problems(self) -> list[str]:
        out = []
        if not self.root.strip():
            out.append(f"root: got {self.root!r}, expected a path")
        if not self.splits:
            out.append("splits: got [], expected at least one split name")
        if DATA_SOURCES[self.kind].needs_name and not self.name:
            out.append(f"name: required when kind is {self.kind!r} (e.g. CIFAR10)")
        if isinstance(self.limit, dict):
            for split, n in self.limit.items():
                if split not in self.splits:
                    out.append(f"limit.{split}: {split!r} is not one of splits {list(self.splits)}")
                if n is not None and n <= 0:
                    out.append(f"limit.{split}: got {n}, expected a positive integer")
        elif self.limit is not None and self.limit <= 0:
            out.append(f"limit: got {self.limit}, expected a positive integer or null")
        if self.kind == "webdataset":
            out += [f"shards.{s}: missing; webdataset needs the tar shards of every split (a brace pattern or a list)"
                    for s in self.splits if s not in self.shards]
            shard_url = next((s for v in self.shards.values() for s in ([v] if isinstance(v, str) else v) if is_url(s)), None)
            if shard_url or self.root.strip():  # an empty root is named once, above
                out += option_problems(shard_url or self.root, self.storage_options, path_key="shards" if shard_url else "root")
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(self) if f.name in KIND_KEYS}
        for key in KIND_KEYS:
            if getattr(self, key) != defaults[key] and key not in DATA_SOURCES[self.kind].reads:
                readers = [k for k, source in DATA_SOURCES.items() if key in source.reads]
                out.append(f"{key}: data.kind {self.kind!r} does not read it (only {', '.join(readers)}); remove it"
                           + ("; image_folder takes its class names from its class folders" if key == "classes" else ""))
        for split in self.split_files:
            if split not in self.splits:
                out.append(f"split_files.{split}: {split!r} is not one of splits {list(self.splits)}")
        return out


@dataclass(frozen=True)
class PreprocessConfig:
    """Overrides of timm's data config for the model; null keeps the model's own value."""

    image_size: Optional[int] = None
    interpolation: Optional[Literal["bilinear", "bicubic", "nearest"]] = None
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    crop_pct: Optional[float] = None

    def problems(self) -> list[str]:
        out = []
        if self.image_size is not None and self.image_size < 8:
            out.append(f"image_size: got {self.image_size}, expected >= 8")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is not None and len(v) != 3:
                out.append(f"{key}: got {list(v)}, expected 3 values (RGB)")
        if self.std is not None and any(s <= 0 for s in self.std):
            out.append(f"std: got {list(self.std)}, expected positive values")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            out.append(f"crop_pct: got {self.crop_pct}, expected a value in (0, 1]")
        return out


@dataclass(frozen=True)
class CompressorConfig:
    name: CompressorName = "zstd"
    level: int = 3

    def problems(self) -> list[str]:
        low, high = COMPRESSOR_LEVELS.get(self.name, (self.level, self.level))
        return [] if low <= self.level <= high else [f"level: got {self.level}, expected {low}..{high} for {self.name}"]


@dataclass(frozen=True)
class StoreConfig:
    # A local directory, or an fsspec URL such as s3://bucket/prefix (kept as the string it is).
    path: PathText
    # For a URL: passed to fsspec, e.g. {endpoint_url: "http://host:9000"}. Credentials belong
    # in the environment (AWS_ACCESS_KEY_ID, ...): this config is saved in the store.
    storage_options: dict[str, Any] = field(default_factory=dict)
    dtype: StoreDtype = "float16"
    # all: every token; cls: prefix token 0; mean: mean of patch tokens; cls_mean: both;
    # grid: prefix tokens + patch tokens average-pooled to grid_size x grid_size.
    tokens: StoreTokens = "all"
    grid_size: int = 2
    # Samples per chunk are chosen so the largest layer's chunk is about chunk_mb
    # (uncompressed); samples_per_chunk overrides that.
    chunk_mb: float = 4.0
    samples_per_chunk: Optional[int] = None
    chunks_per_shard: int = 8
    compressor: CompressorConfig = field(default_factory=CompressorConfig)
    # Views per sample of the augmented split (augment.split): 1 = clean only; K > 1 adds K-1
    # augmented views (augment section), K times that split's disk and extraction time.
    views: int = 1

    def problems(self) -> list[str]:
        out = option_problems(self.path, self.storage_options)
        if self.views < 1:
            out.append(f"views: got {self.views}, expected >= 1 (1: clean only)")
        if self.chunk_mb <= 0:
            out.append(f"chunk_mb: got {self.chunk_mb}, expected > 0")
        if self.samples_per_chunk is not None and self.samples_per_chunk <= 0:
            out.append(f"samples_per_chunk: got {self.samples_per_chunk}, expected > 0")
        if self.chunks_per_shard <= 0:
            out.append(f"chunks_per_shard: got {self.chunks_per_shard}, expected > 0")
        if TOKEN_REDUCTIONS[self.tokens].pools_grid and self.grid_size <= 0:
            out.append(f"grid_size: got {self.grid_size}, expected > 0")
        return out


@dataclass(frozen=True)
class AugmentConfig:
    """How the augmented views (store.views > 1) are made: pipeline/data/augment.py."""

    # The one split that gets augmented views (training images); every other split is clean.
    split: str = "train"
    policy: AugmentPolicy = "crop_flip"
    # Random resized crop: the range of the crop's area (fraction of the image) and aspect ratio.
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    # policy randaugment: timm's RandAugment config string.
    randaugment: str = "rand-m9-mstd0.5-inc1"
    # View v of sample i is drawn with seed sha256("<seed>:<i>:<v>") (augment.view_seed).
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            out.append(f"scale: got {list(self.scale)}, expected 0 < low <= high <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            out.append(f"ratio: got {list(self.ratio)}, expected 0 < low <= high")
        if not 0 <= self.hflip <= 1:
            out.append(f"hflip: got {self.hflip}, expected a probability in [0, 1]")
        if self.policy == "randaugment" and not self.randaugment.startswith("rand"):
            out.append(f"randaugment: got {self.randaugment!r}, expected a timm RandAugment string such as 'rand-m9-mstd0.5-inc1'")
        return out

    def describe(self) -> dict:
        """What decides the pixels of the views (the store's fingerprint records it)."""
        out = {"policy": self.policy, "scale": list(self.scale), "ratio": list(self.ratio), "hflip": self.hflip, "seed": self.seed,
               "seeding": "sha256(seed:index:view)[:8] little-endian -> random, numpy (mod 2**32), torch"}
        return {**out, "randaugment": self.randaugment} if self.policy == "randaugment" else out


@dataclass(frozen=True)
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = 64
    # null: min(4, CPU count) on CUDA, min(2, CPU count) on CPU (the forward needs the cores).
    num_workers: Optional[int] = None
    # CUDA only: autocast dtype for the forward pass.
    amp_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Bounded queue between the forward pass and the background writer (batches).
    write_queue: int = 4

    def problems(self) -> list[str]:
        out = []
        if self.batch_size <= 0:
            out.append(f"batch_size: got {self.batch_size}, expected > 0")
        if self.num_workers is not None and self.num_workers < 0:
            out.append(f"num_workers: got {self.num_workers}, expected >= 0")
        if self.write_queue <= 0:
            out.append(f"write_queue: got {self.write_queue}, expected > 0")
        return out


@dataclass(frozen=True)
class ExtractConfig:
    backbone: BackboneConfig
    data: DataConfig
    store: StoreConfig
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def problems(self) -> list[str]:
        """Contradictions between sections (each section checks its own fields)."""
        out = []
        if self.store.views > 1 and self.augment.split not in self.data.splits:
            out.append(f"augment.split: got {self.augment.split!r}, which is not one of data.splits {list(self.data.splits)} "
                       f"(store.views={self.store.views} augments that split)")
        if self.backbone.cache_kv and self.store.tokens != "all":
            out.append(f"backbone.cache_kv needs store.tokens='all' (VQT attends to every token), got {self.store.tokens!r}")
        return out
