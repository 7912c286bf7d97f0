"""Run the benchmark: prepare each model's files, time every configuration in a subprocess.

Every configuration runs in its own subprocess (``python -m mnv3det.deploy.benchmark.runner
SPEC``, so the peak resident memory is its own) with ``torch.set_num_threads(T)`` and onnxruntime
``intra_op_num_threads=T``. End-to-end time goes from float images in ``[0, 1]`` to detections /
a label map (argmax) and is reported as median ms per image with the interquartile range, plus
images/s; pre-processing (normalise, resize), network and post-processing (decode + NMS /
argmax) are also timed on their own. For ONNX SSDLite the network is a second export without
post-processing (pre-processing is inside it), and post = end-to-end - network. Random weights
are the worst case for SSDLite's post-processing: every class passes the 0.001 score threshold,
so NMS sees 90 x 300 candidates. The command line is :mod:`mnv3det.cli.benchmark`.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from mnv3det.deploy.benchmark.timing import (
    machine_load,
    merge_rounds,
    peak_rss_mb,
    summarise,
    time_calls,
)
from mnv3det.deploy.benchmark.zoo import (
    CONFIGS,
    SSDLiteNetwork,
    apply_score_regime,
    config_runner,
    count_madds,
    our_model,
    parity,
    torchvision_model,
)
from mnv3det.deploy.fast import fuse_conv_bn
from mnv3det.deploy.int8 import quantize_onnx
from mnv3det.deploy.memory import reuse_freed_memory
from mnv3det.deploy.onnx import export_lraspp, export_onnx, export_ssdlite

__all__ = ["BenchmarkError", "prepare", "run_benchmark", "run_worker"]


class BenchmarkError(ValueError):
    """Bad benchmark options."""


def run_worker(spec: dict) -> dict:
    """Time one configuration in this process; returns ms/image statistics and peak RSS."""
    torch.set_num_threads(spec["threads"])
    if spec.get("reuse_memory"):
        reuse_freed_memory()  # before the first large allocation of this worker
    gen = torch.Generator().manual_seed(0)
    h, w = spec["input_size"]
    images = torch.rand(spec["batch"], 3, h, w, generator=gen)
    with torch.inference_mode():
        e2e, stages = config_runner(spec)
        times = time_calls(lambda: e2e(images), spec["iters"], spec["warmup"])
        stage_ms = {}
        for name, fn in stages(images):
            t = time_calls(fn, spec["stage_iters"], 1)
            stage_ms[name] = 1000 * statistics.median(t) / spec["batch"]
    per_image = [1000 * t / spec["batch"] for t in times]
    return {
        **{k: spec[k] for k in ("model", "config", "batch")},
        **summarise(per_image),
        "stages_ms": stage_ms,
        "peak_rss_mb": peak_rss_mb(),
    }


def prepare(
    kind: str,
    workdir: Path,
    input_size: tuple[int, int],
    calib: int,
    configs: Sequence[str],
    weights: str | Path | None = None,
    random_bn: bool = False,
    regime: str | None = None,
) -> dict:
    """Weights file, ONNX exports (fp32, int8), params/MAdds (and LR-ASPP parity) of one model.

    Args:
        kind: ``"ssdlite"`` or ``"lraspp"``.
        workdir: where the files go.
        input_size: ``(H, W)`` of the benchmark images.
        calib: int8 calibration images (random, at the benchmark size; LR-ASPP at half).
        configs: the configurations that will run (ONNX files only when needed).
        weights: torchvision checkpoint instead of random weights.
        random_bn: randomise the BatchNorm statistics of the random weights.
        regime: SSDLite score distribution (:func:`~mnv3det.deploy.benchmark.zoo.apply_score_regime`;
            ``None`` leaves the weights as they are).
    """
    tv = torchvision_model(kind, weights, random_bn)
    info: dict = {}
    if regime is not None:
        example = torch.rand(1, 3, *input_size, generator=torch.Generator().manual_seed(2))
        info["regime"] = regime
        info["regime_stats"] = apply_score_regime(tv, regime, example)
        workdir = workdir / regime
        workdir.mkdir(parents=True, exist_ok=True)
    weights = workdir / f"{kind}_weights.pt"
    torch.save(tv.state_dict(), weights)
    ours = our_model(kind, tv.state_dict())
    info.update(weights=str(weights), params=sum(p.numel() for p in ours.parameters()))
    info["params_tv"] = sum(p.numel() for p in tv.parameters())
    gen = torch.Generator().manual_seed(1)
    if kind == "ssdlite":
        info["madds"] = count_madds(lambda x: ours.head_outputs(x), torch.zeros(1, 3, 320, 320))
    else:
        info["madds"] = count_madds(ours, torch.zeros(1, 3, *input_size))
        info["parity"] = parity(tv, ours, torch.rand(1, 3, *input_size, generator=gen))
    if any(c.startswith("executorch") for c in configs):
        from mnv3det.deploy.benchmark.mobile import prepare_executorch

        info.update(prepare_executorch(kind, ours, workdir, input_size, calib, configs))
    if not any(c.startswith(("onnx", "openvino")) for c in configs):
        return info
    fp32 = workdir / f"{kind}.onnx"
    if kind == "ssdlite":
        export_ssdlite(ours, fp32)
        network = workdir / f"{kind}_network.onnx"
        export_onnx(
            SSDLiteNetwork(fuse_conv_bn(ours)),
            torch.rand(2, 3, 320, 320),
            network,
            ("cls_logits", "bbox_regression"),
        )
        info["onnx_fp32_network"] = str(network)
        calib_size = input_size
    else:
        export_lraspp(ours, fp32, low_res=True)  # label map from the stride-8 logits
        # MinMax calibration keeps every activation of a batch in memory: calibrate at half
        # resolution (activation ranges do not depend on the image size).
        calib_size = (input_size[0] // 2, input_size[1] // 2)
    info["onnx_fp32"] = str(fp32)
    if "onnx_int8" in configs:
        images = [torch.rand(3, *calib_size, generator=gen).numpy() for _ in range(calib)]
        info["onnx_int8"] = str(quantize_onnx(fp32, workdir / f"{kind}.int8.onnx", images))
        if kind == "ssdlite":
            info["onnx_int8_network"] = str(
                quantize_onnx(network, workdir / f"{kind}_network.int8.onnx", images)
            )
    return info


def _spawn(spec: dict) -> dict:
    """:func:`run_worker` in a subprocess (its own peak memory and thread pools)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    if spec.get("passive"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    proc = subprocess.run(
        [sys.executable, "-m", "mnv3det.deploy.benchmark.runner", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"benchmark worker {spec['model']}/{spec['config']}/b{spec['batch']} failed:\n"
            f"{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


def run_benchmark(
    models: Sequence[str],
    batch_sizes: Sequence[int],
    configs: Sequence[str] = CONFIGS,
    iters: int = 20,
    warmup: int = 3,
    threads: int = 2,
    seg_size: tuple[int, int] = (1024, 2048),
    det_size: tuple[int, int] = (320, 320),
    seg_iters: int | None = None,
    calib_images: int = 20,
    subprocesses: bool = True,
    passive: bool = False,
    workdir: str | Path | None = None,
    log: Callable[[str], None] = print,
    rounds: int = 1,
    weights: Mapping[str, str | Path] | None = None,
    random_bn: bool = False,
    regimes: Sequence[str | None] = (None,),
    load: dict | None = None,
    reuse_memory: bool = False,
) -> list[dict]:
    """Time every (model, config, batch) and return the result rows (see module docstring).

    With ``rounds > 1`` the configurations of a batch size are timed in turn, ``rounds`` times
    over, and each row pools its rounds (:func:`merge_rounds`): a slow spell of a shared
    machine then hits every configuration alike instead of one. ``weights`` maps a model
    (``"ssdlite"``, ``"lraspp"``) to a torchvision checkpoint timed instead of random weights;
    ``random_bn`` randomises the BatchNorm statistics of random weights. The rows of a model
    carry ``parity`` (LR-ASPP: max |logits difference| ours vs torchvision) when measured.
    ``regimes``: SSDLite score distributions, each timed as its own model
    (:func:`~mnv3det.deploy.benchmark.zoo.apply_score_regime`). ``load``, when given, receives
    :func:`~mnv3det.deploy.benchmark.timing.machine_load` before (``"before"``) and after
    (``"after"``) the timings. ``reuse_memory`` applies
    :func:`mnv3det.deploy.memory.reuse_freed_memory` in every worker (every row alike).
    """
    if rounds < 1:
        raise BenchmarkError(f"rounds must be >= 1, got {rounds}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(threads)
        if load is not None:
            load["before"] = machine_load(threads)
        jobs = [
            (kind, regime)
            for kind in models
            for regime in (regimes if kind == "ssdlite" else (None,))
        ]
        for kind, regime in jobs:
            size = det_size if kind == "ssdlite" else seg_size
            log(f"[benchmark] preparing {kind} {regime or ''} (weights, ONNX export, int8) ...")
            info = prepare(
                kind,
                work,
                size,
                calib_images,
                configs,
                (weights or {}).get(kind),
                random_bn,
                regime,
            )
            if regime is not None:
                log(f"[benchmark] {regime} scores: {info['regime_stats']}")
            n_iter = iters if kind == "ssdlite" or seg_iters is None else seg_iters
            for batch in batch_sizes:
                timed: dict[str, list[dict]] = {config: [] for config in configs}
                for _round, config in itertools.product(range(rounds), configs):
                    spec = {
                        **info,
                        "model": kind,
                        "config": config,
                        "batch": batch,
                        "threads": threads,
                        "input_size": list(size),
                        "iters": n_iter,
                        "warmup": warmup,
                        "stage_iters": max(3, n_iter // 2),
                        "passive": passive,
                        "reuse_memory": reuse_memory,
                    }
                    row = _spawn(spec) if subprocesses else run_worker(spec)
                    row.update(
                        params=info["params"],
                        madds=info["madds"],
                        input_size=tuple(size),
                        **({"parity": info["parity"]} if "parity" in info else {}),
                        **{k: info[k] for k in ("regime", "regime_stats") if k in info},
                    )
                    log(
                        f"[benchmark] {kind} {regime or ''} {config} b{batch} round {_round + 1}/{rounds}: "
                        f"{row['median_ms']:.1f} ms/img {row['stages_ms']}"
                    )
                    timed[config].append(row)
                results.extend(merge_rounds(timed[config]) for config in configs)
        if load is not None:
            load["after"] = machine_load(threads)
    return results


if __name__ == "__main__":  # the worker of _spawn: one configuration, one JSON line
    print(json.dumps(run_worker(json.loads(sys.argv[1]))))
