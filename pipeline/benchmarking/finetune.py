"""The paragon: full fine-tuning of the backbone, every weight trained, from the images.

Same pretrained weights and image size as the store, a new linear head, AdamW with warm-up +
cosine over the planned epochs, the same seeded validation carve of the train split as the
adapters. Training images get the standard augmentation (timm's random resized crop +
horizontal flip, with the backbone's mean, std and interpolation; no auto-augment, colour
jitter or random erasing); validation and test get the extraction's own transform (resize +
centre crop), so they are the images the cached methods saw. Validation and test are
measured after every epoch and the test accuracy of the best validation epoch is reported
(as the adapters keep their best validation epoch). A run stops after `epochs`, or after
the first epoch whose cumulative training seconds (evaluation not counted) reach
`time_budget_s`. On a GPU it runs with bf16 autocast.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from pipeline.backbones.build import build_backbone
from pipeline.config import ExtractConfig, build
from pipeline.config.extract_config import AugmentConfig
from pipeline.data import open_split
from pipeline.data.augment import train_transform
from pipeline.data.loader import make_loader
from pipeline.progress import quiet
from pipeline.training.schedule import warmup_cosine
from pipeline.training.splits import validation_mask

log = logging.getLogger(__name__)

# Converged: the last epoch's validation accuracy is within this many points of the best
# epoch's, and its mean training loss moved by less than this fraction of the epoch before's.
CONVERGED_VAL_POINTS = 0.5
CONVERGED_LOSS_CHANGE = 0.05
CONVERGED_RULE = (f"the last epoch's validation accuracy within {CONVERGED_VAL_POINTS:g} points of the best epoch's "
                  f"and its mean training loss within {100 * CONVERGED_LOSS_CHANGE:g}% of the epoch before's")


def finetune(extract_cfg: dict, settings: dict, seed: int, train_split: str, test_split: str, val_fraction: float) -> dict:
    """One run at one learning rate (settings["lr"], a number) and one seed."""
    cfg = build(ExtractConfig, extract_cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = build_backbone(cfg.backbone, replace(cfg.preprocess, image_size=settings["image_size"]))
    train_source, test_source = open_split(cfg.data, train_split), open_split(cfg.data, test_split)
    torch.manual_seed(seed)
    random.seed(seed)  # timm's random resized crop draws from `random` when loading in this process
    model = backbone.model
    model.reset_classifier(len(train_source.classes))
    model.requires_grad_(True).to(device)
    is_val = validation_mask(len(train_source), val_fraction, seed)
    train_idx, val_idx, test_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val), np.arange(len(test_source))
    # The same train transform as the store's augmented views (crop and flip), at the bench's crop scale.
    train_tf = train_transform(backbone.data_config, AugmentConfig(scale=tuple(settings["crop_scale"])))
    eval_tf = backbone.transform()
    workers = 4 if device.type == "cuda" else 1

    def loader(source, indices, transform):
        return make_loader(source, transform, indices, backbone.image_size, settings["batch_size"], workers, device.type == "cuda")

    steps_per_epoch = math.ceil(len(train_idx) / settings["batch_size"])
    total, warmup = steps_per_epoch * settings["epochs"], round(settings["warmup_epochs"] * steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    rng = np.random.default_rng(seed)
    budget = settings.get("time_budget_s")
    history, elapsed = [], 0.0
    for epoch in range(settings["epochs"]):
        t0 = time.perf_counter()
        desc = f"fine-tune {cfg.backbone.name} lr {settings['lr']:g} seed {seed} epoch {epoch + 1}/{settings['epochs']}"
        loss = _train_epoch(model, loader(train_source, rng.permutation(train_idx), train_tf), train_source.labels, optimizer,
                            lambda step: settings["lr"] * warmup_cosine(step, total, warmup), epoch * steps_per_epoch, device, desc)
        elapsed += time.perf_counter() - t0
        val = _accuracy(model, loader(train_source, val_idx, eval_tf), train_source, device)
        test = _accuracy(model, loader(test_source, test_idx, eval_tf), test_source, device)
        history.append({"epoch": epoch + 1, "elapsed_s": elapsed, "train_loss": loss, "val_acc": val, "test_acc": test})
        log.info("fine-tune epoch %d: loss %.4f, val %.4f, test %.4f (%.0f s of training so far)", epoch + 1, loss, val, test, elapsed)
        if budget is not None and elapsed >= budget:
            break
    best = max(history, key=lambda h: h["val_acc"])  # the earliest of equals
    return {"val_acc": best["val_acc"], "test_acc": best["test_acc"], "best_epoch": best["epoch"], "lr": settings["lr"],
            "epochs_run": len(history), "epochs_planned": settings["epochs"], "train_s": elapsed,
            "stopped_by_budget": len(history) < settings["epochs"], "converged": converged(history), "converged_rule": CONVERGED_RULE,
            "params": sum(p.numel() for p in model.parameters()), "image_size": settings["image_size"],
            "train_transform": repr(train_tf), "eval_transform": repr(eval_tf), "history": history, "device": device.type}


def converged(history: list[dict]) -> bool:
    """CONVERGED_RULE; one epoch cannot show it."""
    if len(history) < 2:
        return False
    last, before = history[-1], history[-2]
    best_val = max(h["val_acc"] for h in history)
    return (100 * (best_val - last["val_acc"]) <= CONVERGED_VAL_POINTS
            and abs(last["train_loss"] - before["train_loss"]) <= CONVERGED_LOSS_CHANGE * before["train_loss"])


def _train_epoch(model, batches, labels: np.ndarray, optimizer, lr_at, step: int, device, desc: str) -> float:
    """One pass over the training batches; the mean training loss."""
    model.train()
    losses = []
    bar = tqdm(batches, unit="batch", desc=desc, dynamic_ncols=True, disable=quiet())
    for index, images, errors in bar:
        ok = torch.tensor([not e for e in errors])
        images, target = images[ok].to(device), torch.from_numpy(labels[index[ok].numpy()]).to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(images), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def _accuracy(model, loader, source, device) -> float:
    model.eval()
    correct = total = 0
    for index, images, errors in loader:
        ok = torch.tensor([not e for e in errors])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            predicted = model(images[ok].to(device)).argmax(-1).cpu()
        correct += int((predicted.numpy() == source.labels[index[ok].numpy()]).sum())
        total += int(ok.sum())
    return correct / max(total, 1)
