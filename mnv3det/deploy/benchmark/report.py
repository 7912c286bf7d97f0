"""The benchmark's markdown table (one row per model, configuration and batch size)."""

from __future__ import annotations

import platform

import torch

from mnv3det.deploy.benchmark.zoo import LABELS, MODEL_NAMES

__all__ = ["markdown_table"]


def markdown_table(rows: list[dict], threads: int, notes: list[str] | tuple[str, ...] = ()) -> str:
    """The results as one markdown table (speed-up relative to torchvision at the same batch).

    Args:
        rows: result rows of :func:`mnv3det.deploy.benchmark.runner.run_benchmark`.
        threads: the threads every configuration ran with (for the footnote).
        notes: more footnote lines (e.g. the parity of ours and torchvision's outputs).
    """
    base = {
        (r["model"], r.get("regime"), r["batch"]): r["median_ms"]
        for r in rows
        if r["config"] == "torchvision"
    }
    lines = [
        "| model | config | batch | ms/img (median) | IQR ms/img | img/s | vs torchvision "
        "| pre ms/img | network ms/img | post ms/img | peak RSS MB | params | MAdds/img |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        h, w = r["input_size"]
        st = r["stages_ms"]
        ref = base.get((r["model"], r.get("regime"), r["batch"]))
        regime = f" ({r['regime']} scores)" if r.get("regime") else ""
        ratio = f"{r['median_ms'] / ref:.2f}x" if ref else "-"
        pre = f"{st['pre']:.1f}" if "pre" in st else "in graph"
        # ONNX SSDLite: post = end-to-end minus the network-only graph (marked *)
        post = f"{st['post']:.1f}" if "post" in st else f"{r['median_ms'] - st['network']:.1f}*"
        lines.append(
            f"| {MODEL_NAMES.get(r['model'], r['model'])} {h}x{w}{regime} | {LABELS[r['config']]} | "
            f"{r['batch']} | {r['median_ms']:.1f} | {r['p25_ms']:.1f}-{r['p75_ms']:.1f} | "
            f"{r['images_per_s']:.1f} | {ratio} | {pre} | {st['network']:.1f} | {post} | "
            f"{r['peak_rss_mb']:.0f} | {r['params'] / 1e6:.2f}M | {r['madds'] / 1e9:.2f}G |"
        )
    cpu = platform.processor() or platform.machine()
    lines.append("")
    lines.append(
        f"{threads} threads (torch.set_num_threads / ORT intra_op_num_threads), {cpu}, "
        f"torch {torch.__version__}. End to end = float images in [0, 1] -> detections / label "
        "map. * = end-to-end minus the network-only ONNX graph (which includes pre-processing)."
        + (
            f" Timings pooled over {rows[0]['rounds']} interleaved rounds."
            if rows and rows[0].get("rounds", 1) > 1
            else ""
        )
    )
    lines.extend(notes)
    return "\n".join(lines)
