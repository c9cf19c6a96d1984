"""BENCHMARKS.md and its plots, from the bench's results (every number comes from a run)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

PLOTS = "benchmark_plots"


def write_benchmarks(out: Path, result: dict) -> Path:
    plots = out / PLOTS
    plots.mkdir(parents=True, exist_ok=True)
    (out / "bench_results.json").write_text(json.dumps(result, indent=1, default=str))
    names = _plot_all(result, plots)
    path = out / "BENCHMARKS.md"
    path.write_text(_markdown(result, names))
    return path


def _pct(v, sd=None) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}" + (f" ± {100 * sd:.2f}" if sd is not None else "")  # ± 0.00: seeds that agree


def _markdown(r: dict, plots: list[str]) -> str:
    m, cfg = r["machine"], r["config"]
    gpu = m["gpu"] or "none"
    lines = [
        "# Benchmarks",
        "",
        f"Reproduce: `python -m pipeline bench {r['config_path']}` (resumable: finished units are kept under "
        f"`{cfg['output']}/units` and reused). This file is written by that command.",
        "",
        f"- Run on {m['date']}, commit `{m['commit']}`: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"{m['memory_gb']} GiB RAM, GPU: {gpu}. Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v) + ".",
        f"- Wall time of this invocation: {r['wall_s'] / 60:.1f} min ({r['units_computed']} units computed, "
        f"{r['units_reused']} reused from earlier runs).",
        "",
        "## Protocol",
        "",
        f"- Seeds {cfg['seeds']}: each seed sets the validation carve ({100 * cfg['val_fraction']:.0f}% of train), the data order "
        "and the adapters' initialization.",
        f"- Adapters: {cfg['epochs']} epochs, batch {cfg['batch_size']}, AdamW, {cfg['warmup_epochs']} warm-up epoch(s) then cosine; "
        "each member keeps its best validation epoch. Every grid point is trained per seed (fused, one cache pass per epoch); "
        "the configuration with the **best validation accuracy averaged over the seeds** is chosen, and its **test** accuracy "
        "is reported as mean ± sample standard deviation over the seeds. Test never chooses anything.",
        "- *Train time* and *peak memory*: the chosen configuration trained **alone** in a fresh process (seed "
        f"{cfg['seeds'][0]}), reading included; peak memory = the process's peak resident set size minus its size "
        "just before training, libraries already loaded (0.5-0.8 GB of torch, timm, zarr and dask not counted). "
        "For the ensemble, the time of its whole fused grid. Fine-tuning: per run, mean over seeds.",
        "- Trainable parameters are absolute and as % of the backbone's parameters.",
        "",
    ]
    for case in r["cases"]:
        lines += _case_section(case, cfg)
    if r.get("speed"):
        lines += _speed_section(r["speed"])
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({PLOTS}/{p})" for p in plots] + [""]
    return "\n".join(lines) + "\n"


def _case_section(case: dict, cfg: dict) -> list[str]:
    size = "x".join(map(str, case["image_size"]))
    splits = ", ".join(f"{k} {v}" for k, v in case["splits"].items())
    grid = next(c for c in cfg["cases"] if c["name"] == case["name"])
    lines = [
        f"## {case['name']}: {case['backbone']} ({case['weights']} weights) at {size} px",
        "",
        f"Samples: {splits} (validation is carved from `{case['train_split']}`, test is `{case['test_split']}`). "
        f"Store: {case['store']['dtype']}, tokens `{case['store']['tokens']}`, {case['store']['kb_on_disk']:.1f} KB per sample on disk. "
        f"Backbone: {case['backbone_params']:,} parameters.",
        "",
        "Grids: " + "; ".join(_grid_text(e) for e in grid["methods"]) + ".",
        "",
    ] + ([grid["notes"].strip(), ""] if grid.get("notes") else []) + [
        "| method | trainable params | % of backbone | train time (s) | peak memory (MB) | val acc | **test acc** (mean ± sd, seeds) | chosen on validation |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in sorted(case["rows"], key=lambda x: -(x["test_acc"] or 0)):
        params = "-" if row["params"] is None else f"{row['params']:,}"
        share = "-" if row["pct_backbone"] is None else f"{row['pct_backbone']:.2f}"
        wall = f"{row['wall_s']:.1f}" + (f" ({row['time_note']})" if row.get("time_note") else "") if row.get("wall_s") is not None else "-"
        mem = "-" if row.get("peak_mb") is None else f"{row['peak_mb']:.0f}" + (f" (GPU {row['gpu_peak_mb']:.0f})" if row.get("gpu_peak_mb") else "")
        lines.append(f"| {row['method']} | {params} | {share} | {wall} | {mem} | {_pct(row['val_acc'], row['val_acc_sd'])} | "
                     f"**{_pct(row['test_acc'], row['test_acc_sd'])}** ({row['seeds']}) | {row['config']} |")
    lines += [""]
    lines += _targets_section(case)
    lines += _paragon_lines(case)
    reference = case.get("sklearn_per_layer") or {}
    for kind, rows in case["per_layer"].items():
        with_ref = kind.startswith("linear") and reference
        lines += [f"### {kind} per layer (best configuration per layer on validation)", "",
                  "| layer | val acc | test acc |" + (" sklearn test (C) | difference |" if with_ref else "") + " configuration |",
                  "|---|---:|---:|" + ("---:|---:|" if with_ref else "") + "---|"]
        for x in rows:
            ref = reference.get(x["method"]) if with_ref else None
            extra = (f" {_pct(ref['test_acc'], ref['test_acc_sd'])} ({ref['C']}) | {100 * (x['test_acc'] - ref['test_acc']):+.2f} |"
                     if ref else (" - | - |" if with_ref else ""))
            lines.append(f"| {x['method']} | {_pct(x['val_acc'], x['val_acc_sd'])} | {_pct(x['test_acc'], x['test_acc_sd'])} |{extra} {x['config']} |")
        lines += [""]
    if case.get("store_variants"):
        lines += _storage_section(case)
    if case.get("views"):
        lines += _views_section(case)
    return lines


def _grid_text(entry: dict) -> str:
    lbfgs = entry.get("solver") == "lbfgs"
    parts = [f"L-BFGS, l2 {entry['weight_decay']}"] if lbfgs else [f"lr {entry['lr']}", f"wd {entry['weight_decay']}"]
    if entry.get("standardize") is False:
        parts.append("raw features")
    if entry.get("hparams"):
        parts.append(", ".join(f"{k} {v}" for k, v in entry["hparams"].items()))
    if entry.get("layers"):
        parts.append(f"layers {entry['layers']}")
    return f"{entry['kind']}: " + ", ".join(parts)


def _row(case: dict, prefix: str) -> dict | None:
    return next((x for x in case["rows"] if x["method"].startswith(prefix) and x.get("test_acc") is not None), None)


def targets(case: dict) -> list[dict]:
    """The issue's accuracy targets for one case, each {"target", "measured", "met"}: every
    comparison is of mean test accuracies over the seeds, each side chosen on validation."""
    out = []
    sk = next((x for x in case["rows"] if x["kind"] == "sklearn"), None)

    def add(target: str, ours: dict | None, ref: float | None, margin: float = 0.0, ref_name: str = "", note: str = "") -> None:
        if ours is None or ref is None:
            return
        diff = 100 * (ours["test_acc"] - ref)
        met = diff >= -margin - 1e-9
        out.append({"target": target, "measured": f"{100 * ours['test_acc']:.2f} vs {ref_name} {100 * ref:.2f} ({_points(diff, margin, met)}){note}",
                    "met": met})

    exact_last = _row(case, "linear probe (L-BFGS, exact), last layer")
    if sk is not None:
        add("our linear probe (exact), last layer >= sklearn - 0.3", exact_last, sk["test_acc"], 0.3, "sklearn")
        per_layer = case.get("sklearn_per_layer") or {}
        rows = case["per_layer"].get("linear_lbfgs") or []
        pairs = [(x, per_layer[x["method"]]["test_acc"]) for x in rows if x and x["method"] in per_layer]
        if pairs:
            worst = min(pairs, key=lambda p: p[0]["test_acc"] - p[1])
            diff = 100 * (worst[0]["test_acc"] - worst[1])
            met = diff >= -0.3 - 1e-9
            out.append({"target": "our linear probe (exact) >= sklearn - 0.3 in every per-layer row",
                        "measured": f"worst row {worst[0]['method']}: {100 * worst[0]['test_acc']:.2f} vs {100 * worst[1]:.2f} "
                                    f"({_points(diff, 0.3, met)})",
                        "met": met})
    tied = best_on_validation([x for x in case["rows"] if x["kind"] in ("linear", "inca", "losa", "vqt") and x.get("val_acc") is not None])
    if tied and sk is not None:  # with a tie, met only if every tied choice meets it
        low = min(tied, key=lambda x: x["test_acc"])
        add(f"best cached adapter chosen on validation ({low['method']}) >= sklearn", low, sk["test_acc"], 0.0, "sklearn", tie_note(tied, low, "lowest"))
    greedy = _row(case, "greedy ensemble over every method's grid")
    if greedy is not None and tied:
        high = max(tied, key=lambda x: x["test_acc"])
        add("greedy calibrated ensemble >= best single adapter", greedy, high["test_acc"], 0.0, "best single", tie_note(tied, high, "highest"))
    losa = next((x for x in case["rows"] if x["kind"] == "losa" and x.get("test_acc") is not None), None)
    if losa is not None and exact_last is not None:
        add("LoSA >= last-layer linear probe (exact)", losa, exact_last["test_acc"], 0.0, "probe")
    vqt = next((x for x in case["rows"] if x["kind"] == "vqt" and x.get("test_acc") is not None), None)
    exact_best = _row(case, "linear probe (L-BFGS, exact), best layer")
    if vqt is not None and exact_best is not None:
        add("VQT >= best-layer linear probe (exact)", vqt, exact_best["test_acc"], 0.0, "probe")
    return out


def _points(diff: float, margin: float, met: bool) -> str:
    """A difference in points beside its verdict: two places, more where two would read as the
    other verdict (-0.303 printed as -0.30 against a margin of 0.3)."""
    places = 2
    while (round(diff, places) >= -margin) != met and places < 6:
        places += 1
    return f"{diff:+.{places}f}"


def best_on_validation(rows: list[dict]) -> list[dict]:
    """Every row at the best mean validation accuracy: on a tie, the config's order must not
    choose (it decided a headline verdict before)."""
    top = max((x["val_acc"] for x in rows), default=None)
    return [x for x in rows if x["val_acc"] == top]


def tie_note(tied: list[dict], chosen: dict, which: str) -> str:
    """What a verdict says when several rows tie on validation: which of them it compares."""
    if len(tied) == 1:
        return ""
    others = ", ".join(x["method"] for x in tied if x is not chosen)
    return f"; tied on validation with {others}: the {which} test accuracy of the tied rows is compared"


def _targets_section(case: dict) -> list[str]:
    rows = targets(case)
    if not rows:
        return []
    return (["Targets (mean test accuracy over the seeds, each side chosen on validation):", "",
             "| target | measured (points) | met |", "|---|---|---|"]
            + [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in rows] + [""])


HEADLINE_START = "<!-- bench headline: written by `python -m pipeline bench`; edits here are overwritten -->"
HEADLINE_END = "<!-- end of bench headline -->"


def headline_markdown(result: dict) -> str:
    """The README's summary: per case the rows that matter most, then every target."""
    lines = [f"Measured by `python -m pipeline bench {result['config_path']}` on {result['machine']['date']} "
             f"(commit `{result['machine']['commit']}`, {result['machine']['cpu']}, {result['machine']['cores']} cores); "
             "every row, loser included, is in [BENCHMARKS.md](BENCHMARKS.md).", ""]
    for case in result["cases"]:
        size = "x".join(map(str, case["image_size"]))
        lines += [f"**{case['name']}** ({case['backbone']}, {size} px):", "",
                  "| method | trainable params (% of backbone) | train time (s) | test acc, mean ± sd |", "|---|---:|---:|---:|"]
        for row in sorted(case["rows"], key=lambda x: -(x["test_acc"] or 0)):
            params = "-" if row["params"] is None else f"{row['params']:,}" + (f" ({row['pct_backbone']:.2f}%)" if row["pct_backbone"] else "")
            wall = "-" if row.get("wall_s") is None else f"{row['wall_s']:.1f}"
            lines.append(f"| {row['method']} | {params} | {wall} | {_pct(row['test_acc'], row['test_acc_sd'])} |")
        lines += [""] + _targets_section(case)
    return "\n".join(lines)


def write_headline(path: Path, result: dict) -> None:
    """Replace the block between the markers in `path` (a README) with the headline."""
    replace_block(path, HEADLINE_START, HEADLINE_END, headline_markdown(result))


def has_headline_block(path: Path) -> bool:
    """Whether `path` has the two markers `write_headline` rewrites between."""
    return path.is_file() and _has_block(path.read_text(), HEADLINE_START, HEADLINE_END)


def _has_block(text: str, start: str, end: str) -> bool:
    return start in text and end in text


def replace_block(path: Path, start: str, end: str, body: str, append: bool = False) -> None:
    """Rewrite the text between the marker lines `start` and `end` in `path`, atomically;
    with `append`, a file without them (or no file) gets the block at its end."""
    text = path.read_text() if path.exists() else ""
    if _has_block(text, start, end):
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
    elif append:
        head, tail = (text.rstrip("\n") + "\n\n" if text else ""), "\n"
    else:
        raise ValueError(f"{path}: no block to rewrite; add the two marker lines {start!r} and {end!r}")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{head}{start}\n{body.rstrip()}\n{end}{tail}")
    tmp.replace(path)


def standalone_markers(script: str) -> tuple[str, str]:
    """The marker lines of the section a stand-alone script (benchmarks/...) writes into
    BENCHMARKS.md; `bench` keeps such sections when it rewrites the file."""
    return f"<!-- {script}: written by that script; kept when `bench` rewrites this file -->", f"<!-- end of {script} -->"


_STANDALONE = re.compile(r"<!-- (benchmarks/[\w./-]+): written by that script; kept when `bench` rewrites this file -->\n"
                         r".*?<!-- end of \1 -->\n?", re.S)


def with_standalone_sections(report: str, previous: str) -> str:
    """`report` followed by every stand-alone script's section found in `previous`."""
    kept = [m.group(0).rstrip("\n") for m in _STANDALONE.finditer(previous)]
    return "\n\n".join([report.rstrip("\n"), *kept]) + "\n"


BACK_RAZOR = ("For scale: Back Razor (Jiang et al., NeurIPS 2022) reports saving up to 9.2x memory by fine-tuning with "
              "self-sparsified backpropagation (GPU memory, on its own models and data sets)")


def _paragon_lines(case: dict) -> list[str]:
    """How the paragon was trained, the best cached adapter's gap to it, and what each costs."""
    fine = next((x for x in case["rows"] if x["kind"] == "finetune"), None)
    if fine is None:
        return []
    out = []
    p = fine.get("paragon")
    if p:
        budget = ("" if p["time_budget_s"] is None else
                  f", stopped after the first epoch whose cumulative training time (evaluation not counted) reached {p['time_budget_s']:g} s")
        search = ", ".join(f"{x['lr']:g}: {_pct(x['val_acc'])}" for x in p["lr_search"])
        out.append(f"- Full fine-tuning protocol: every weight trained with a new linear head at {p['image_size']} px; training images "
                   f"get random resized crop (area {p['crop_scale']}) + horizontal flip, validation and test the extraction's resize + "
                   f"centre crop. Warm-up + cosine over the {p['epochs_planned']} planned epochs{budget} (epochs run per seed: "
                   f"{p['epochs_run']}); the test accuracy of the best validation epoch is reported. Learning rate: each of "
                   f"{[x['lr'] for x in p['lr_search']]} trained on seed {p['lr_seed']}, the best validation accuracy chose "
                   f"**{p['lr']:g}** (val {search}), and the other seeds ran at it; the search's {len(p['lr_search'])} runs took "
                   f"{p['search_wall_s']:.0f} s in all (the times below are per run). Converged ({p['converged_rule']}): {_yes_no(p['converged'])} per seed.")
    adapters = [x for x in case["rows"] if x["kind"] in ("linear", "inca", "losa", "vqt") and x["test_acc"] is not None]
    if not adapters or fine["test_acc"] is None:
        return out + [""]
    tied = best_on_validation(adapters)  # chosen on validation, as everything here
    best = min(tied, key=lambda x: x["test_acc"])  # on a tie, the less favourable to the adapters
    gap = 100 * (best["test_acc"] - fine["test_acc"])
    noise = 100 * ((best["test_acc_sd"] or 0) + (fine["test_acc_sd"] or 0))
    share = f", with {100 * best['params'] / fine['params']:.2f}% of its trainable parameters" if best.get("params") and fine.get("params") else ""
    out.append(f"- Best cached adapter on validation ({best['method']}) vs full fine-tuning: **{gap:+.2f} points** of test accuracy "
               f"(seed spreads add to {noise:.2f}){share}{tie_note(tied, best, 'lowest')}.")
    extract_s = case.get("extract_s")
    if fine.get("wall_s") and best.get("wall_s"):
        if extract_s is not None:
            out.append(f"- Time: full fine-tuning {fine['wall_s']:.0f} s per run / (extraction {extract_s:.0f} s + adapter "
                       f"{best['wall_s']:.1f} s) = **{fine['wall_s'] / (extract_s + best['wall_s']):.1f}x**; the extraction is paid "
                       f"once for every adapter, configuration and seed on this store.")
        else:
            out.append(f"- Time: full fine-tuning {fine['wall_s']:.0f} s per run / adapter {best['wall_s']:.1f} s = "
                       f"{fine['wall_s'] / best['wall_s']:.1f}x (the extraction's time is not in these results, so not included).")
    if fine.get("peak_mb") and best.get("peak_mb"):
        ratio = fine["peak_mb"] / best["peak_mb"]
        out.append(f"- Peak memory: full fine-tuning {fine['peak_mb']:.0f} MB / adapter {best['peak_mb']:.0f} MB = **{ratio:.1f}x**. "
                   f"{BACK_RAZOR}; ours, {ratio:.1f}x, is measured as the peak resident set size of a process on "
                   f"{'a GPU machine' if fine.get('device') == 'cuda' else 'CPU'}, not GPU memory, so the comparison is indicative only.")
    return out + [""]


def _yes_no(flags: list[bool]) -> str:
    return ", ".join("yes" if f else "no" for f in flags)


def _storage_section(case: dict) -> list[str]:
    base = case["store_variants"][0]
    lines = [f"### Storage options: disk per sample and the accuracy each costs ({case['name']})", "",
             "Each option is a separate extraction of the same images; the chosen linear (last layer) and InCA "
             "configurations are retrained on it with the same seeds.", "",
             "| option | dtype | tokens | KB / sample on disk | KB / sample raw | vs as extracted (disk) | linear test | InCA test |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for o in case["store_variants"]:
        acc = {k: _pct(v["test_acc"], v["test_acc_sd"]) for k, v in o["accuracy"].items()}
        lines.append(f"| {o['option']} | {o['dtype']} | {o['tokens']} | {o['kb_on_disk']:.1f} | {o['kb_raw']:.1f} | "
                     f"{o['kb_on_disk'] / base['kb_on_disk']:.2f}x | {acc.get('linear', '-')} | {acc.get('inca', '-')} |")
    return lines + [""]


def _views_section(case: dict) -> list[str]:
    rows = case["views"]
    names = list(rows[0]["methods"])
    paragon = next((x for x in case["rows"] if x["kind"] == "finetune"), None)
    lines = [f"### Augmented views per training image ({case['name']})", "",
             "Each count K is its own store of the same images (`store.views: K`): view 0 clean, K-1 views from timm's train "
             "transform (random resized crop + flip), seeded per sample and view. Training draws one view per sample per epoch "
             "(`views: random`; the exact probe solves on every view at once), with the main table's epochs and steps; each "
             "method's configuration is chosen on mean validation at each K, test accuracy is mean ± sd over the seeds. "
             "Epoch time is one fused pass of the method's whole grid. KB / image on disk is the store's bytes over all its "
             "images, training (K views each) and test (one) together.", "",
             "| views K | KB / image on disk | extraction (s) | " + " | ".join(f"{n} test (epoch s)" for n in names) + " | best on validation |",
             "|---:|---:|---:|" + "---:|" * len(names) + "---|"]
    for r in rows:
        cells = []
        for n in names:
            m = r["methods"][n]
            epoch = f" ({m['grid_epoch_s']:.1f})" if m.get("grid_epoch_s") is not None else ""
            cells.append(f"{_pct(m['test_acc'], m['test_acc_sd'])}{epoch}")
        extract = "-" if r["extract_s"] is None else f"{r['extract_s']:.0f}"
        lines.append(f"| {r['views']} | {r['kb_on_disk']:.1f} | {extract} | " + " | ".join(cells) + f" | {r['best']} |")
    lines.append("")
    if paragon is not None:
        lines += [f"Full fine-tuning (paragon) on the same images: **{_pct(paragon['test_acc'], paragon['test_acc_sd'])}** test "
                  f"({paragon['seeds']} seed(s); see the main table).", ""]
    target = views_target(rows, paragon["test_acc"] if paragon else None)
    if target is not None:
        closed = "" if target["gap_closed"] is None else f", {100 * target['gap_closed']:.0f}% of the gap to the paragon closed"
        lines += [f"Target (K={target['k']} adds >= 1 point over K=1, each K's best cached method chosen on validation, or closes "
                  f"half K=1's gap to the paragon): {100 * target['top']:.2f} ({target['top_method']}) vs {100 * target['base']:.2f} ({target['base_method']}) "
                  f"({target['gain_points']:+.2f} points{closed}): "
                  f"**{'met' if target['met'] else 'not met'}**.", ""]
    return lines


def views_target(rows: list[dict], paragon_test: float | None) -> dict | None:
    """The issue's target: at the largest K, the best cached method (chosen on validation) adds
    at least 1 point of test accuracy over K = 1's, or closes half of K = 1's gap to the paragon."""
    if len(rows) < 2 or rows[0]["views"] != 1:
        return None
    first, last = rows[0], rows[-1]
    base, top = first["methods"][first["best"]]["test_acc"], last["methods"][last["best"]]["test_acc"]
    gain = 100 * (top - base)
    closed = None
    if paragon_test is not None and paragon_test > base:
        closed = (top - base) / (paragon_test - base)
    return {"k": last["views"], "base": base, "top": top, "base_method": first["best"], "top_method": last["best"], "gain_points": gain, "gap_closed": closed,
            "met": gain >= 1.0 - 1e-9 or (closed is not None and closed >= 0.5)}


def _speed_section(s: dict) -> list[str]:
    e, rd, t = s["extract"], s["read"], s["train"]
    return [
        f"## Speed and scale ({s['case']}; ratios measured side by side in one run)", "",
        "| measure | value | ratio |", "|---|---|---:|",
        f"| bare forward (loader + forward to the cached layers), {e['images']} images at {e['image_size'][0]} px | "
        f"{e['bare_img_s']:.1f} img/s | |",
        f"| extract (the same + encode + zarr write) | {e['extract_img_s']:.1f} img/s | **{e['ratio_median']:.2f}** x bare "
        f"(median of {len(e['round_ratios'])} paired rounds: {', '.join(f'{x:.2f}' for x in e['round_ratios'])}) |",
        f"| cache reader, shuffled batches of all {rd['layers']} layers, float32 out | {rd['reader_mb_s']:.0f} MB/s "
        f"({rd['reader_samples_s']:.0f} samples/s) | |",
        f"| plain zarr, the same chunks in the same order | {rd['plain_zarr_mb_s']:.0f} MB/s | reader / plain zarr **{rd['reader_over_plain']:.2f}** |",
        f"| raw bytes of the shard files ({rd['on_disk_mb']:.0f} MB on disk, page cache) | {rd['raw_mb_s']:.0f} MB/s (compressed) | |",
        f"| 1 InCA adapter on `{t['layer']}`, one epoch from the cache ({t['train_samples']} samples) | {t['one_epoch_s']:.2f} s | 1.00 |",
        f"| {t['fused_n']} InCA adapters (lr grid), fused, one pass | {t['fused_epoch_s']:.2f} s | **{t['fused_epoch_s'] / t['one_epoch_s']:.2f}** x one |",
        f"| {t['mixed_n']} mixed adapters (linear + InCA x every layer x 2 lr), one pass | {t['mixed_epoch_s']:.2f} s | "
        f"{t['mixed_epoch_s'] / t['one_epoch_s']:.2f} x one |",
        *[f"| {h['adapters']} InCA adapter(s) on `{h['layer']}`, one epoch on {h['device']}: store held in memory / streamed / "
          f"floor (float32 batches already in a list) | {statistics.median(h['seconds']['held']):.2f} / {statistics.median(h['seconds']['streamed']):.2f} / "
          f"{statistics.median(h['seconds']['floor']):.2f} s | "
          f"held **{h['held_over_floor']:.2f}**, streamed {h['streamed_over_floor']:.2f} x the floor's speed |"
          for h in s["held"]],
        f"| the same InCA adapter with the backbone in the loop ({t['online_samples']} samples) | {t['online_s']:.1f} s | "
        f"**{t['online_over_cached_per_sample']:.0f}x** slower per sample |",
        f"| sweep of {t['sweep_k']} configs x {t['sweep_epochs']} epochs: extract once ({t['extract_once_s']:.0f} s) + cached trainings | "
        f"{t['sweep_cached_s']:.0f} s | 1.00 |",
        f"| the same sweep with the backbone in the loop | {t['sweep_online_s']:.0f} s | **{t['sweep_online_s'] / t['sweep_cached_s']:.1f}x** |",
        "",
        "The sweep rows are computed from the measured per-sample rates above (extraction rate, cached and online epochs) for "
        "the whole train split; they are not a separate run.",
        "",
    ]


def _plot_all(result: dict, plots: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    names = []
    for name, draw in (("accuracy_vs_params.png", _accuracy_vs_params), ("accuracy_per_layer.png", _accuracy_per_layer),
                       ("time_vs_accuracy.png", _time_vs_accuracy),
                       ("accuracy_vs_training_time.png", _accuracy_vs_training_time)):
        fig, axes = plt.subplots(1, len(cases), figsize=(6.2 * len(cases), 4.6), squeeze=False)
        drawn = [draw(ax, case) for ax, case in zip(axes[0], cases)]
        if any(drawn):
            fig.tight_layout()
            fig.savefig(plots / name, dpi=110)
            names.append(name)
        plt.close(fig)
    return names


def _accuracy_vs_params(ax, case) -> bool:
    return _test_accuracy_against(ax, case, "params", "o", "trainable parameters (log)", "accuracy vs trainable parameters")


def _accuracy_per_layer(ax, case) -> bool:
    drawn = False
    for kind, rows in case["per_layer"].items():
        xs = list(range(len(rows)))
        for key, style in (("val_acc", "-o"), ("test_acc", "--x")):
            ax.errorbar(xs, [100 * x[key] for x in rows], yerr=[100 * (x[f"{key}_sd"] or 0) for x in rows], fmt=style, capsize=3,
                        label=f"{kind} ({key.split('_')[0]})")
        ax.set_xticks(xs, [x["method"] for x in rows], rotation=45, ha="right", fontsize=7)
        drawn = True
    ax.set(xlabel="cached layer (shallow to deep)", ylabel="accuracy (%)", title=f"{case['name']}: accuracy per layer (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    if drawn:  # a case without per-layer rows has nothing to name
        ax.legend(fontsize=7)
    return drawn


def _time_vs_accuracy(ax, case) -> bool:
    return _test_accuracy_against(ax, case, "wall_s", "s", "training wall time, s (log)", "training time vs accuracy")


def _accuracy_vs_training_time(ax, case) -> bool:
    """The paragon's test accuracy after each epoch against its cumulative training seconds (one
    line per seed, a star at the best validation epoch), and each cached method as a point at
    the store's extraction seconds + its training seconds (training alone when extract_s is absent)."""
    extract_s = case.get("extract_s")
    fine = next((x for x in case["rows"] if x["kind"] == "finetune"), None)
    histories = [h for h in ((fine or {}).get("paragon") or {}).get("history", []) if h and "elapsed_s" in h[0]]
    for i, history in enumerate(histories):
        ax.plot([h["elapsed_s"] for h in history], [100 * h["test_acc"] for h in history], "-o", ms=3, color="k", alpha=0.7,
                label="full fine-tuning, per epoch (one line per seed)" if i == 0 else None)
        best = max(history, key=lambda h: h["val_acc"])
        ax.plot(best["elapsed_s"], 100 * best["test_acc"], "*", ms=11, color="k", label="its best validation epoch" if i == 0 else None)
    cached = [x for x in case["rows"] if x["kind"] != "finetune" and x.get("wall_s") and x["test_acc"] is not None]
    for i, x in enumerate(cached):
        ax.errorbar((extract_s or 0) + x["wall_s"], 100 * x["test_acc"], yerr=100 * (x["test_acc_sd"] or 0), fmt="s", capsize=3,
                    color=f"C{i % 10}", label=x["method"])
    where = "extraction + training" if extract_s is not None else "training only (no extraction time)"
    ax.set_xscale("log")
    ax.set(xlabel=f"seconds (log)\nfine-tuning: cumulative training; cached: {where}", ylabel="test accuracy (%)",
           title=f"{case['name']}: accuracy vs training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return bool(histories or cached)


def _test_accuracy_against(ax, case, key: str, marker: str, xlabel: str, title: str) -> bool:
    """One point per method with a value for `key` (log x) and its test accuracy ± sd."""
    rows = [x for x in case["rows"] if x.get(key) and x["test_acc"] is not None]
    for i, x in enumerate(rows):
        ax.errorbar(x[key], 100 * x["test_acc"], yerr=100 * (x["test_acc_sd"] or 0), fmt=marker, capsize=3, color=f"C{i % 10}", label=x["method"])
    ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title=f"{case['name']}: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return bool(rows)
