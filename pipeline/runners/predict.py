"""Apply saved adapters (several tasks at once) to new images: one backbone pass per batch.

    featurecache predict --adapter runs/a/adapters/01_x --adapter runs/b/adapters/01_y IMAGES... [--out preds.csv]

The backbone is rebuilt from each adapter's store fingerprint (weights hash checked), only
the layers the adapters read are captured, and they get the store's token reduction and its
storage rounding (fp16/int8...), so a prediction equals the adapter applied to the cached
features of the same image. The forward runs in float32 on the CPU: for a store extracted
under autocast (bf16/fp16 on CUDA) that equality cannot hold, and predict says so.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cache import ConfigError, StoreError, cannot_write, encoding
from pipeline.adapters import load_adapter, read_adapter_manifest, saved_fingerprint
from pipeline.adapters.persistence import MANIFEST_FILE
from pipeline.backbones.taps import EMBED, LayerTaps
from pipeline.backbones.tokens import reduce_tokens, reduced_spec
from pipeline.data.image_folder import is_image_name
from pipeline.data.source import read_image
from pipeline.training.frozen_backbone import rebuild_backbone

log = logging.getLogger(__name__)


@dataclass
class Task:
    name: str
    directory: Path
    manifest: dict


def find_images(paths: list[str]) -> list[Path]:
    """Files as given; in a folder, what extraction takes as samples: image names that are not
    hidden, outside hidden folders (.ipynb_checkpoints/ held copies that were predicted too,
    and macOS's ._x.jpg, which are no images, failed the run). A broken link is kept: reading
    it fails and names it."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(_images_under(p))
        elif p.is_file():
            found.append(p)
        else:
            raise ConfigError(f"image {str(p)!r} does not exist (expected an image file or a folder of images)")
    if not found:
        raise ConfigError(f"no images found in {paths}")
    return found


def _images_under(folder: Path) -> list[Path]:
    """Through linked folders too, as extraction's class folders (Path.rglob skipped them);
    a folder reached twice (a link to an ancestor) is searched once."""
    found, searched = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        dirs[:] = [] if real in searched else [d for d in dirs if not d.startswith(".")]
        if real not in searched:
            searched.add(real)
            # A name that is a folder (x.jpg/) is in dirs; a broken link is in files, kept: reading it names it.
            found += [Path(root) / name for name in files if is_image_name(name)]
    return found


def check_adapter_dirs(adapter_dirs: list[str]) -> None:
    """One ConfigError naming every adapter folder that is missing or holds no adapter."""
    problems = []
    for d in map(Path, adapter_dirs):
        if d.is_file():
            problems.append(f"--adapter {str(d)!r} is a file; give the adapter's folder ({str(d.parent)!r}?)")
        elif not d.is_dir():
            problems.append(f"adapter folder {str(d)!r} does not exist")
        elif not (d / MANIFEST_FILE).is_file():
            problems.append(f"{str(d)!r} is not an adapter folder: it has no {MANIFEST_FILE} (expected runs/NAME/adapters/NN_*)")
    if problems:
        raise ConfigError(problems)


def run_predict(adapter_dirs: list[str], images: list[str], batch_size: int = 32) -> list[dict]:
    check_adapter_dirs(adapter_dirs)
    tasks = [Task(name, Path(d), read_adapter_manifest(d)) for name, d in zip(task_names(adapter_dirs), adapter_dirs)]
    files = find_images(images)
    by_backbone: dict[str, list[Task]] = {}
    for t in tasks:  # tasks whose stores were made alike share one forward pass
        fp = saved_fingerprint(t.manifest).to_json()
        # The layers too: how each was tapped (e.g. through the final norm) decides its values.
        key = json.dumps([fp[k] for k in ("backbone", "preprocessing", "storage", "layers")], sort_keys=True)
        by_backbone.setdefault(key, []).append(t)
    rows = [{"image": str(f)} for f in files]
    for group in by_backbone.values():
        _predict_group(group, files, rows, batch_size)
    return rows


def _check_same_layers(fp, raw: dict, needed: list[str], where: Path) -> None:
    """The layers the rebuilt backbone gives, as stored, must be the ones the store recorded:
    an adapter fed tokens of another shape, grid or prefix would predict from the wrong features."""
    # A store made before registers_only was recorded lacks it (its adapters read the same
    # tokens either way): where the record says False, the rebuilt flag is not compared.
    recorded = {s.name: s for s in fp.layers}
    now = {n: reduced_spec(raw[n], fp.storage.tokens, fp.storage.grid_size) for n in needed if n in raw}
    now = {n: replace(s, registers_only=False) if not recorded[n].registers_only else s for n, s in now.items()}
    differ = [f"{n}: stored {recorded[n]}, rebuilt {now.get(n)}" for n in needed if now.get(n) != recorded[n]]
    if differ:
        raise StoreError(f"the store of adapter {str(where)!r}: the rebuilt backbone does not give the stored layers ({'; '.join(differ)}); "
                         "predict cannot compute the features its adapters were trained on (was the store made by another version "
                         "of this code or of timm?)")


def _predict_group(tasks: list[Task], files: list[Path], rows: list[dict], batch_size: int) -> None:
    fp = saved_fingerprint(tasks[0].manifest)
    backbone = rebuild_backbone(fp, f"the store of adapter {str(tasks[0].directory)!r}")
    autocast = (fp.compute or {}).get("autocast")
    if autocast is not None:
        log.warning("adapters %s were trained on features extracted under %s autocast on %s; predict runs the backbone in "
                    "float32 on the CPU, so near a decision boundary a prediction can differ from the adapter applied to the "
                    "cached features of the same image", [t.name for t in tasks], autocast, fp.compute.get("device"))
    adapters = [load_adapter(t.directory, saved_fingerprint(t.manifest), backbone_modules=backbone.model).eval() for t in tasks]
    stored = {}
    for a in adapters:
        stored.update(a.layer_specs)
    needed = [s.name for s in fp.layers if s.name in stored]
    features = tuple(n for n in needed if n != EMBED and stored[n].holds_features)
    # Keys/values (VQT on a store extracted with backbone.cache_kv) come from every block's
    # qkv projection, captured as extraction captured them.
    wants_kv = any(not stored[n].holds_features for n in needed)
    normed = any(s.through_final_norm for s in fp.layers)
    taps = LayerTaps(backbone.model, features, EMBED in needed, backbone.image_size, cache_kv=wants_kv, through_final_norm=normed)
    raw = {s.name: s for s in taps.specs}
    storage = fp.storage
    _check_same_layers(fp, raw, needed, tasks[0].directory)
    transform = backbone.transform()
    for start in range(0, len(files), batch_size):
        chunk = files[start: start + batch_size]
        x = torch.stack([transform(_load(f)) for f in chunk])
        with torch.no_grad():
            feats = taps(x)
            feats = {n: _as_cached(reduce_tokens(feats[n], raw[n], storage.tokens, storage.grid_size), storage.dtype) for n in needed}
            for t, a in zip(tasks, adapters):
                probs = a(feats).softmax(-1)
                conf, pred = probs.max(-1)
                names = t.manifest.get("class_names") or [str(i) for i in range(a.num_classes)]
                for row, p, c in zip(rows[start: start + len(chunk)], pred.tolist(), conf.tolist()):
                    row[t.name] = names[p]
                    row[f"{t.name}_prob"] = round(c, 6)
    taps.close()


def _as_cached(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """The same rounding the store applies, so predictions match cached-feature predictions."""
    enc = encoding(dtype)
    return enc.decode(*enc.encode(x))


def _load(path: Path):
    # Decoded as extraction decodes; an unreadable file stops predict with one error naming it.
    return read_image(path)


def task_names(directories: list[str]) -> list[str]:
    """One unique column name per adapter: its run's folder name (runs/RUN/adapters/NN_x), or
    RUN/NN_x for adapters that share a run; a name that still clashes is an error, so no task
    can overwrite another's column."""
    paths = [Path(os.path.abspath(d)) for d in directories]  # "." and ".." by their names; links as given
    runs = [p.parent.parent.name if p.parent.name == "adapters" else p.name for p in paths]
    names = [f"{run}/{p.name}" if runs.count(run) > 1 and p.parent.name == "adapters" else run for run, p in zip(runs, paths)]
    # Columns: image, then per task NAME and NAME_prob; no two may coincide.
    columns = ["image"] + [c for n in names for c in (n, f"{n}_prob")]
    clashes = sorted({n for n in names if columns.count(n) > 1 or columns.count(f"{n}_prob") > 1})
    if clashes:
        raise ConfigError(f"predict: adapters {[str(p) for p, n in zip(paths, names) if n in clashes]} would share the task "
                          f"name(s) {clashes}; give each adapter once, from folders with distinct names")
    return names


def write_predictions(rows: list[dict], out: str) -> None:
    """Written beside the file `out` names (through a link, its target), then moved onto it: a
    full disk left a CSV cut short under the real name (some images' predictions missing) and
    a traceback. A device or a pipe (/dev/stdout) is written as it is."""
    path = Path(out).resolve()
    if path.is_dir():
        raise ConfigError(f"--out: {out!r} is a folder; give the file to write (.csv, or .json)")
    with cannot_write(f"predictions {out!r}", f"{out!r} is left as it was"):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not path.is_file():
            _write_rows(rows, path, json_format=Path(out).suffix == ".json")
            return
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            _write_rows(rows, tmp, json_format=Path(out).suffix == ".json")
            if path.exists():
                shutil.copymode(path, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _write_rows(rows: list[dict], path: Path, json_format: bool) -> None:
    if json_format:
        path.write_text(json.dumps(rows, indent=2))
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


__all__ = ["run_predict", "write_predictions", "find_images"]
