"""The paragon: full fine-tuning of the backbone, every weight trained, from the images.

Same pretrained weights as the store, a new linear head, AdamW with warm-up + cosine, the
same seeded validation carve of the train split as the adapters; validation and test are
measured after every epoch and the test accuracy of the best validation epoch is reported
(as the adapters keep their best validation epoch). Augmentation: horizontal flips only.
On a CPU the image size and epoch count are cut (the config states them); on a GPU it
runs with bf16 autocast.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from pipeline.backbones.build import build_backbone
from pipeline.config import ExtractConfig, build
from pipeline.data import open_split
from pipeline.data.loader import make_loader
from pipeline.train import validation_mask
from pipeline.training.schedule import warmup_cosine

log = logging.getLogger(__name__)


def finetune(extract_cfg: dict, settings: dict, seed: int, train_split: str, test_split: str, val_fraction: float) -> dict:
    cfg = build(ExtractConfig, extract_cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = build_backbone(cfg.backbone, replace(cfg.preprocess, image_size=settings["image_size"]))
    model = backbone.model
    train_source, test_source = open_split(cfg.data, train_split), open_split(cfg.data, test_split)
    torch.manual_seed(seed)
    model.reset_classifier(len(train_source.classes))
    model.requires_grad_(True).to(device)
    params = sum(p.numel() for p in model.parameters())
    is_val = validation_mask(len(train_source), val_fraction, seed)
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    transform = backbone.transform()
    workers = 4 if device.type == "cuda" else 1

    def loader(source, indices):
        return make_loader(source, transform, indices, backbone.image_size, settings["batch_size"], workers, device.type == "cuda")

    steps_per_epoch = math.ceil(len(train_idx) / settings["batch_size"])
    total = steps_per_epoch * settings["epochs"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    rng = np.random.default_rng(seed)
    best, step, history = None, 0, []
    for epoch in range(settings["epochs"]):
        model.train()
        t0 = time.perf_counter()
        bar = tqdm(loader(train_source, rng.permutation(train_idx)), total=steps_per_epoch, unit="batch",
                   desc=f"fine-tune {cfg.backbone.name} seed {seed} epoch {epoch + 1}/{settings['epochs']}", dynamic_ncols=True)
        for index, images, errors in bar:
            ok = torch.tensor([not e for e in errors])
            images, labels = images[ok].to(device), torch.from_numpy(train_source.labels[index[ok].numpy()]).to(device)
            flip = torch.rand(len(images), device=device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            for group in optimizer.param_groups:
                group["lr"] = settings["lr"] * warmup_cosine(step, total, steps_per_epoch // 2)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        train_s = time.perf_counter() - t0
        val, test = _accuracy(model, loader(train_source, val_idx), train_source, device), _accuracy(model, loader(test_source, np.arange(len(test_source))), test_source, device)
        history.append({"epoch": epoch + 1, "train_s": train_s, "val_acc": val, "test_acc": test})
        log.info("fine-tune epoch %d: val %.4f, test %.4f (%.0f s)", epoch + 1, val, test, train_s)
        if best is None or val > best["val_acc"]:
            best = history[-1]
    return {"val_acc": best["val_acc"], "test_acc": best["test_acc"], "best_epoch": best["epoch"], "params": params,
            "image_size": settings["image_size"], "history": history, "device": device.type}


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
