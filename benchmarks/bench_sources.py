"""Extraction from tar shards and from a Hugging Face dataset, against ImageFolder, for the same images.

    python benchmarks/bench_sources.py [--data ../shared/data/imagenette] [--split train] [--rounds 3] [--workers 2]
                                       [--config configs/imagenette_lite0.yaml] [--image-size 128]

The split's JPEG files are copied into a temporary ImageFolder tree, written as WebDataset
shards of 500 samples (webdataset's TarWriter) and as a datasets dataset (save_to_disk). Two
measurements, side by side in one process, in alternating rounds (image_folder, webdataset,
huggingface, then again):
- open: the split opened (files listed and stamped, tar headers indexed, dataset loaded);
- load: every sample read, decoded and preprocessed by the extraction's loader (the
  config's transform, `--workers` loader processes), no backbone; the floor is the same
  decode and transform of encoded bytes already in a Python list (no source at all);
- extract: `run_extract` of the split into a fresh store (backbone forward and zarr writes
  included), the whole stage one a user runs.
Reports images/s (median of the rounds) and each source's ratio to ImageFolder (> 1: faster).
Prints a markdown table; writes bench_out/bench_sources.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ExtractConfig, apply_overrides, build, load_yaml  # noqa: E402
from pipeline.data.loader import make_loader  # noqa: E402
from pipeline.data.source import decode_image  # noqa: E402
from pipeline.runners.extract import plan_extraction, run_extract  # noqa: E402

SOURCES = ("image_folder", "webdataset", "huggingface")


def write_sources(data: Path, split: str, out: Path) -> tuple[dict, list[bytes]]:
    """The split as an ImageFolder copy, tar shards and a saved dataset; data sections for each."""
    import datasets
    import webdataset

    classes = sorted(p.name for p in (data / split).iterdir() if p.is_dir())
    samples = [(f, c) for c, cls in enumerate(classes) for f in sorted((data / split / cls).iterdir())]
    encoded = [f.read_bytes() for f, _ in samples]
    for (f, _), blob in zip(samples, encoded):
        (out / "folder" / split / f.parent.name).mkdir(parents=True, exist_ok=True)
        (out / "folder" / split / f.parent.name / f.name).write_bytes(blob)
    (out / "shards").mkdir()
    per_shard = 500
    for s in range(0, len(samples), per_shard):
        with webdataset.TarWriter(str(out / "shards" / f"{split}-{s // per_shard:04d}.tar")) as sink:
            for (f, label), blob in zip(samples[s:s + per_shard], encoded[s:s + per_shard]):
                sink.write({"__key__": f"{f.parent.name}/{f.stem}", "jpg": blob, "cls": label})
    last = (len(samples) - 1) // per_shard
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    rows = {"image": [{"bytes": b, "path": None} for b in encoded], "label": [c for _, c in samples]}
    datasets.DatasetDict({split: datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(out / "saved"))
    sections = {
        "image_folder": {"kind": "image_folder", "root": str(out / "folder")},
        "webdataset": {"kind": "webdataset", "root": str(out / "shards"), "shards": {split: f"{split}-{{0000..{last:04d}}}.tar"},
                       "classes": classes},
        "huggingface": {"kind": "huggingface", "root": str(out / "saved")},
    }
    return sections, encoded


def config(base: dict, data: dict, split: str, store: Path, workers: int) -> ExtractConfig:
    return build(ExtractConfig, {**base, "data": {**data, "splits": [split]}, "store": {**base.get("store", {}), "path": str(store)},
                                 "runtime": {**base.get("runtime", {}), "num_workers": workers}})


def load_rate(cfg: ExtractConfig, split: str, workers: int) -> tuple[float, float]:
    """(seconds to open the split: listing, tar header index, dataset load; images per second loaded)."""
    t0 = time.perf_counter()
    plan = plan_extraction(cfg)
    opened = time.perf_counter() - t0
    source = plan.sources[split]
    loader = make_loader(source, plan.view_transform(0), list(range(len(source))), plan.backbone.image_size,
                         cfg.runtime.batch_size, workers, False)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return opened, len(source) / (time.perf_counter() - t0)


def floor_rate(cfg: ExtractConfig, encoded: list[bytes]) -> float:
    transform = plan_extraction(cfg).view_transform(0)
    t0 = time.perf_counter()
    for k, blob in enumerate(encoded):
        transform(decode_image(blob, str(k)))
    return len(encoded) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"))
    p.add_argument("--split", default="train")
    p.add_argument("--config", default="configs/imagenette_lite0.yaml")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    logging.disable(logging.INFO)
    base = apply_overrides(load_yaml(args.config), [f"preprocess.image_size={args.image_size}"])
    rates: dict[str, dict[str, list[float]]] = {s: {"open_s": [], "load": [], "extract": []} for s in SOURCES}
    floor: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sections, encoded = write_sources(Path(args.data), args.split, out)
        print(f"{len(encoded)} images of {args.data}/{args.split}; {args.rounds} rounds", flush=True)
        for r in range(args.rounds):
            for name in SOURCES:
                cfg = config(base, sections[name], args.split, out / f"{name}-{r}.zarr", args.workers)
                opened, rate = load_rate(cfg, args.split, args.workers)
                rates[name]["open_s"].append(opened)
                rates[name]["load"].append(rate)
                t0 = time.perf_counter()
                run_extract(cfg)
                rates[name]["extract"].append(len(encoded) / (time.perf_counter() - t0))
            floor.append(floor_rate(config(base, sections["image_folder"], args.split, out / "floor.zarr", 0), encoded))
            print(f"round {r + 1}: " + ", ".join(f"{n} {rates[n]['load'][-1]:.0f}/{rates[n]['extract'][-1]:.0f} img/s" for n in SOURCES), flush=True)
    med = {n: {k: statistics.median(v) for k, v in rates[n].items()} for n in SOURCES}
    print("\nsource | open s | load img/s | load / ImageFolder | extract img/s (open included) | extract / ImageFolder")
    print("--- | --- | --- | --- | --- | ---")
    for n in SOURCES:
        print(f"{n} | {med[n]['open_s']:.2f} | {med[n]['load']:.0f} | {med[n]['load'] / med['image_folder']['load']:.2f} | "
              f"{med[n]['extract']:.0f} | {med[n]['extract'] / med['image_folder']['extract']:.2f}")
    print(f"floor (decode + transform of bytes in RAM, one process) | | {statistics.median(floor):.0f} | | |")
    Path("bench_out").mkdir(exist_ok=True)
    Path("bench_out/bench_sources.json").write_text(json.dumps({"images": len(encoded), "rounds": rates, "floor": floor,
                                                                  "workers": args.workers, "image_size": args.image_size}, indent=1))


if __name__ == "__main__":
    main()
