"""What share of a VQT training step is the key/value projection of the cached tokens?

VQT's keys and values, K_l = k_norm(norm1(X_l) W_k + b_k) and V_l = norm1(X_l) W_v + b_v, depend
only on the cached block inputs X_l and the frozen backbone, never on a trainable parameter.
So they could be computed once in stage one and cached instead of X_l. This measures how much
of a step that would save, on ViT-S/14-sized tensors (random weights: the cost does not depend
on their values): D=384, 6 heads, 12 blocks, 1+64 tokens (112 px), batch 64, on CPU,
timed as median process CPU time.

    step          = forward (K/V + query path + head) + cross-entropy + backward + AdamW step
    K/V           = the K/V projections of all 12 blocks alone (run without autograd, as in VQT)
    step with K/V = the same step given precomputed K/V (what a K/V cache would leave)

Run from the repository root: PYTHONPATH=. python benchmarks/bench_vqt_kv.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

from cache import LayerSpec
from pipeline.adapters import VQT, VQTHparams

BATCH, NUM_CLASSES = 64, 100


def median_seconds(fns: dict, repeats: int) -> dict:
    """Median CPU time of each function, run round-robin.

    CPU time of this process rather than wall time, so that other processes on a shared
    machine do not count; with one thread it is the compute time itself. Round-robin so that
    what they still disturb (caches, memory bandwidth) hits every function alike.
    """
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-queries", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--repeats", type=int, default=20)
    # One thread by default: CPU time then equals compute time (see median_seconds).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    backbone = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=112, num_classes=0
    ).eval()
    tokens = 1 + 8 * 8
    names = ["embed"] + [f"blocks.{i}" for i in range(len(backbone.blocks))]
    layers = {
        name: LayerSpec(
            name, tokens, backbone.embed_dim, prefix_tokens=1, grid=(8, 8), block_index=index - 1
        )
        for index, name in enumerate(names)
    }
    torch.manual_seed(0)
    features = {name: torch.randn(BATCH, tokens, backbone.embed_dim) for name in names}
    labels = torch.randint(0, NUM_CLASSES, (BATCH,))
    final_tokens = features[names[-1]]
    print(
        f"ViT-S/14 tensors: D={backbone.embed_dim}, heads={backbone.blocks[0].attn.num_heads}, "
        f"blocks={len(backbone.blocks)}, T={tokens}, batch={BATCH}, CPU threads={args.threads}"
    )

    for num_queries in args.num_queries:
        vqt = VQT(layers, NUM_CLASSES, backbone.blocks, backbone.norm, VQTHparams(num_queries))
        optimizer = torch.optim.AdamW(vqt.parameters(), lr=1e-3)
        keys_values = vqt.keys_values(features)

        def train_step(logits_fn):
            optimizer.zero_grad()
            F.cross_entropy(logits_fn(), labels).backward()
            optimizer.step()

        fns = {
            "step": lambda: train_step(lambda: vqt(features)),
            "kv": lambda: vqt.keys_values(features),
            "step_cached_kv": lambda: train_step(lambda: vqt.classify(keys_values, final_tokens)),
        }
        median_seconds(fns, repeats=2)  # warm-up: allocator, kernel selection
        medians = median_seconds(fns, args.repeats)
        t_step, t_kv, t_cached = medians["step"], medians["kv"], medians["step_cached_kv"]
        print(
            f"num_queries={num_queries:3d}: step {t_step * 1e3:7.1f} ms | K/V {t_kv * 1e3:7.1f} ms "
            f"= {t_kv / t_step:5.1%} of the step | step with precomputed K/V "
            f"{t_cached * 1e3:7.1f} ms (saves {1 - t_cached / t_step:5.1%})"
        )


if __name__ == "__main__":
    main()
