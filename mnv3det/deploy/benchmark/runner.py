"""``mnv3det benchmark``: one speed table, ours next to torchvision's, on this machine (paper §7).

For SSDLite320-MobileNetV3-Large and LR-ASPP-MobileNetV3-Large it builds torchvision's model
with random weights, loads its ``state_dict`` into ours (``weights=``, so both compute the same
function), exports ONNX fp32 (with decoding + NMS for SSDLite) and int8 (:mod:`mnv3det.deploy.int8`)
and times, at each batch size:

* ``torchvision``: torchvision's model in eager mode (its own transform and post-processing);
* ``ours eager``: our model as trained (BatchNorms, our batched post-processing);
* ``ours fused`` / ``ours fused+CL``: :class:`mnv3det.deploy.FastSSDLite` /
  :func:`mnv3det.deploy.fast.optimize_for_inference` (conv+BN folded; CL = channels_last);
* ``ONNX fp32`` / ``ONNX int8``: onnxruntime, CPU provider, all graph optimisations.

Every configuration runs in its own subprocess (so the peak resident memory, ``ru_maxrss``, is
its own) with ``torch.set_num_threads(T)`` and onnxruntime ``intra_op_num_threads=T``. End-to-end
time goes from float images in ``[0, 1]`` to detections / a label map (argmax) and is reported as
median ms per image with the interquartile range, plus images/s; pre-processing (normalise,
resize), network and post-processing (decode + NMS / argmax) are also timed on their own. For
ONNX SSDLite the network is a second export without post-processing (pre-processing is inside
it), and post = end-to-end - network. Random weights are the worst case for SSDLite's
post-processing: every class passes the 0.001 score threshold, so NMS sees 90 x 300 candidates.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["main", "run_benchmark"]

CONFIGS = ("torchvision", "eager", "fused", "fused_cl", "onnx_fp32", "onnx_int8")
LABELS = {
    "torchvision": "torchvision eager",
    "eager": "ours eager",
    "fused": "ours fused",
    "fused_cl": "ours fused+CL",
    "onnx_fp32": "ONNX fp32",
    "onnx_int8": "ONNX int8",
}


class BenchmarkError(ValueError):
    """Bad benchmark options."""


# ----------------------------------------------------------------------------- models
def torchvision_model(kind: str) -> nn.Module:
    """torchvision's model with random weights (seeded)."""
    import torchvision

    torch.manual_seed(0)
    if kind == "ssdlite":
        return torchvision.models.detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None
        ).eval()
    return torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21
    ).eval()


def our_model(kind: str, state: dict[str, Tensor]) -> nn.Module:
    """Ours with torchvision's weights, rebuilt by
    :func:`mnv3det.models.from_checkpoint.load_model` (it reads the tail and the classes from
    the tensors: reduced tail and 91 classes for SSDLite, full tail and 21 for LR-ASPP)."""
    from mnv3det.models.from_checkpoint import load_model

    return load_model(state, builder=kind)


class _SSDLiteNetwork(nn.Module):
    """The ONNX "network" graph of SSDLite: pre-processing + layers, no post-processing."""

    def __init__(self, deploy: nn.Module) -> None:
        super().__init__()
        self.deploy = deploy

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.deploy.network(images)


def count_madds(model: nn.Module, example: Tensor) -> int:
    """Multiply-adds of one forward (conv/linear/matmul; FLOPs / 2, the paper's convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(example)
    return counter.get_total_flops() // 2


# ----------------------------------------------------------------------------- worker side
def _runner(spec: dict) -> tuple[Callable, list[tuple[str, Callable]]]:
    """``(end_to_end(images), [(stage name, thunk-chain builder)...])`` for one config."""
    kind, config = spec["model"], spec["config"]
    from mnv3det.deploy.wrappers import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    if config.startswith("onnx"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["threads"]
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if spec.get("passive"):
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(spec[config], options, providers=["CPUExecutionProvider"])
        if kind == "ssdlite":
            net_session = ort.InferenceSession(
                spec[config + "_network"], options, providers=["CPUExecutionProvider"]
            )

            def e2e(x: Tensor):
                return session.run(None, {"images": x.numpy()})

            def stages(x: Tensor):
                return [("network", lambda: net_session.run(None, {"images": x.numpy()}))]

            return e2e, stages

        def seg_net(x: Tensor):
            return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])

        def e2e(x: Tensor):
            return seg_net(x).argmax(1)

        def stages(x: Tensor):
            logits = seg_net(x)
            return [("network", lambda: seg_net(x)), ("post", lambda: logits.argmax(1))]

        return e2e, stages

    from mnv3det.weights import read_state_dict

    state, _ = read_state_dict(spec["weights"])
    if config == "torchvision":
        model = torchvision_model(kind)
        model.load_state_dict(state)
    else:
        model = our_model(kind, state)

    if kind == "ssdlite":
        if config == "torchvision":
            tv = model

            def e2e(x: Tensor):
                return tv(list(x))

            def stages(x: Tensor):
                images, _ = tv.transform(list(x))
                features = list(tv.backbone(images.tensors).values())
                head = tv.head(features)
                anchors = tv.anchor_generator(images, features)
                original = [tuple(i.shape[-2:]) for i in x]

                def post():
                    dets = tv.postprocess_detections(head, anchors, images.image_sizes)
                    return tv.transform.postprocess(dets, images.image_sizes, original)

                def net():
                    f = list(tv.backbone(images.tensors).values())
                    return tv.head(f), tv.anchor_generator(images, f)

                return [("pre", lambda: tv.transform(list(x))), ("network", net), ("post", post)]

            return e2e, stages
        if config == "eager":

            def stages(x: Tensor):
                batch, original, _ = model.preprocess(x)
                outputs, anchors = model.head_outputs(batch)
                return [
                    ("pre", lambda: model.preprocess(x)),
                    ("network", lambda: model.head_outputs(batch)),
                    ("post", lambda: model.postprocess(outputs, anchors, original)),
                ]

            return model, stages
        from mnv3det.deploy.wrappers import FastSSDLite

        fast = FastSSDLite(model, channels_last=config == "fused_cl")

        def stages(x: Tensor):
            batch, scale = fast.preprocess(x)
            outputs = fast.network(batch)
            return [
                ("pre", lambda: fast.preprocess(x)),
                ("network", lambda: fast.network(batch)),
                ("post", lambda: fast.postprocess(*outputs, scale)),
            ]

        return fast, stages

    # LR-ASPP: normalise -> logits -> argmax
    channels_last = config == "fused_cl"
    if config in ("fused", "fused_cl"):
        from mnv3det.deploy.fast import optimize_for_inference

        model = optimize_for_inference(model, channels_last=channels_last)

    def pre(x: Tensor) -> Tensor:
        y = (x - mean) / std
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y

    def net(y: Tensor) -> Tensor:
        out = model(y)
        return out["out"] if isinstance(out, dict) else out

    def e2e(x: Tensor):
        return net(pre(x)).argmax(1)

    def stages(x: Tensor):
        y = pre(x)
        logits = net(y)
        return [
            ("pre", lambda: pre(x)),
            ("network", lambda: net(y)),
            ("post", lambda: logits.argmax(1)),
        ]

    return e2e, stages


def _time(fn: Callable, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_worker(spec: dict) -> dict:
    """Time one configuration in this process; returns ms/image statistics and peak RSS."""
    torch.set_num_threads(spec["threads"])
    gen = torch.Generator().manual_seed(0)
    h, w = spec["input_size"]
    images = torch.rand(spec["batch"], 3, h, w, generator=gen)
    with torch.inference_mode():
        e2e, stages = _runner(spec)
        times = _time(lambda: e2e(images), spec["iters"], spec["warmup"])
        stage_ms = {}
        for name, fn in stages(images):
            t = _time(fn, spec["stage_iters"], 1)
            stage_ms[name] = 1000 * statistics.median(t) / spec["batch"]
    per_image = [1000 * t / spec["batch"] for t in times]
    return {
        **{k: spec[k] for k in ("model", "config", "batch")},
        **summarise(per_image),
        "stages_ms": stage_ms,
        "peak_rss_mb": peak_rss_mb(),
    }


def summarise(per_image_ms: Sequence[float]) -> dict:
    """Median, interquartile range and images/s of per-image times (kept for pooling)."""
    t = np.asarray(per_image_ms, dtype=float)
    return {
        "median_ms": float(np.median(t)),
        "p25_ms": float(np.percentile(t, 25)),
        "p75_ms": float(np.percentile(t, 75)),
        "images_per_s": float(1000 / np.median(t)),
        "per_image_ms": t.tolist(),
    }


def merge_rounds(rows: Sequence[dict]) -> dict:
    """One row from the rounds of one (model, config, batch): timings pooled, stage times the
    median over rounds, peak memory the largest."""
    stages = {
        name: statistics.median(r["stages_ms"][name] for r in rows) for name in rows[0]["stages_ms"]
    }
    return {
        **rows[0],
        **summarise([t for r in rows for t in r["per_image_ms"]]),
        "stages_ms": stages,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
        "rounds": len(rows),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    Linux's ``VmHWM`` (``/proc/self/status``) belongs to the current address space, so it starts
    afresh in a subprocess; ``ru_maxrss`` survives ``exec`` and would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- parent side
def prepare(kind: str, workdir: Path, input_size: tuple[int, int], calib: int, configs) -> dict:
    """Weights file, ONNX exports (fp32, int8) and params/MAdds of one model."""
    from mnv3det.deploy.onnx import export_lraspp, export_onnx, export_ssdlite

    tv = torchvision_model(kind)
    weights = workdir / f"{kind}_weights.pt"
    torch.save(tv.state_dict(), weights)
    ours = our_model(kind, tv.state_dict())
    info: dict = {"weights": str(weights), "params": sum(p.numel() for p in ours.parameters())}
    info["params_tv"] = sum(p.numel() for p in tv.parameters())
    gen = torch.Generator().manual_seed(1)
    if kind == "ssdlite":
        info["madds"] = count_madds(lambda x: ours.head_outputs(x), torch.zeros(1, 3, 320, 320))
    else:
        info["madds"] = count_madds(ours, torch.zeros(1, 3, *input_size))
    if not any(c.startswith("onnx") for c in configs):
        return info
    fp32 = workdir / f"{kind}.onnx"
    if kind == "ssdlite":
        from mnv3det.deploy.fast import fuse_conv_bn
        from mnv3det.deploy.wrappers import SSDLiteDeploy

        export_ssdlite(ours, fp32)
        network = workdir / f"{kind}_network.onnx"
        deploy = SSDLiteDeploy(fuse_conv_bn(ours))
        export_onnx(
            _SSDLiteNetwork(deploy),
            torch.rand(2, 3, 320, 320),
            network,
            ("cls_logits", "bbox_regression"),
        )
        info["onnx_fp32_network"] = str(network)
        calib_size = input_size
    else:
        export_lraspp(ours, fp32)
        # MinMax calibration keeps every activation of a batch in memory: calibrate at half
        # resolution (activation ranges do not depend on the image size).
        calib_size = (input_size[0] // 2, input_size[1] // 2)
    info["onnx_fp32"] = str(fp32)
    if "onnx_int8" in configs:
        from mnv3det.deploy.int8 import quantize_onnx

        images = [torch.rand(3, *calib_size, generator=gen).numpy() for _ in range(calib)]
        info["onnx_int8"] = str(quantize_onnx(fp32, workdir / f"{kind}.int8.onnx", images))
        if kind == "ssdlite":
            info["onnx_int8_network"] = str(
                quantize_onnx(network, workdir / f"{kind}_network.int8.onnx", images)
            )
    return info


def _spawn(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    if spec.get("passive"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    proc = subprocess.run(
        [sys.executable, "-m", "mnv3det.deploy.benchmark.runner", "--worker", json.dumps(spec)],
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
) -> list[dict]:
    """Time every (model, config, batch) and return the result rows (see module docstring).

    With ``rounds > 1`` the configurations of a batch size are timed in turn, ``rounds`` times
    over, and each row pools its rounds (:func:`merge_rounds`): a slow spell of a shared
    machine then hits every configuration alike instead of one.
    """
    if rounds < 1:
        raise BenchmarkError(f"rounds must be >= 1, got {rounds}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(threads)
        for kind in models:
            size = det_size if kind == "ssdlite" else seg_size
            log(f"[benchmark] preparing {kind} (weights, ONNX export, int8) ...")
            info = prepare(kind, work, size, calib_images, configs)
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
                    }
                    row = _spawn(spec) if subprocesses else run_worker(spec)
                    row.update(
                        params=info["params"],
                        madds=info["madds"],
                        input_size=tuple(size),
                    )
                    log(
                        f"[benchmark] {kind} {config} b{batch} round {_round + 1}/{rounds}: "
                        f"{row['median_ms']:.1f} ms/img {row['stages_ms']}"
                    )
                    timed[config].append(row)
                results.extend(merge_rounds(timed[config]) for config in configs)
    return results


def markdown_table(rows: list[dict], threads: int) -> str:
    """The results as one markdown table (speed-up relative to torchvision at the same batch)."""
    base = {(r["model"], r["batch"]): r["median_ms"] for r in rows if r["config"] == "torchvision"}
    lines = [
        "| model | config | batch | ms/img (median) | IQR ms/img | img/s | vs torchvision "
        "| pre ms/img | network ms/img | post ms/img | peak RSS MB | params | MAdds/img |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"ssdlite": "SSDLite320-MNV3-Large", "lraspp": "LR-ASPP-MNV3-Large"}
    for r in rows:
        h, w = r["input_size"]
        st = r["stages_ms"]
        ref = base.get((r["model"], r["batch"]))
        ratio = f"{r['median_ms'] / ref:.2f}x" if ref else "-"
        pre = f"{st['pre']:.1f}" if "pre" in st else "in graph"
        # ONNX SSDLite: post = end-to-end minus the network-only graph (marked *)
        post = f"{st['post']:.1f}" if "post" in st else f"{r['median_ms'] - st['network']:.1f}*"
        lines.append(
            f"| {names.get(r['model'], r['model'])} {h}x{w} | {LABELS[r['config']]} | "
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
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected HxW like 1024x2048, got {text!r}") from err
    return h, w


def main(argv: Sequence[str] | None = None) -> int:
    """``mnv3det benchmark``: print the markdown speed table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        print(json.dumps(run_worker(json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(prog="mnv3det benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="ssdlite,lraspp", help="ssdlite,lraspp")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=",".join(CONFIGS))
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per config")
    parser.add_argument("--seg-iters", type=int, default=None, help="iterations for LR-ASPP")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time the configurations in turn this many times and pool them (drift on a "
        "shared machine then hits every configuration alike)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seg-size", type=_size, default=(1024, 2048))
    parser.add_argument("--det-size", type=_size, default=(320, 320), help="input image size")
    parser.add_argument("--calib-images", type=int, default=20, help="int8 calibration images")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per config")
    parser.add_argument(
        "--passive",
        action="store_true",
        help="threads sleep instead of spinning while waiting (OMP_WAIT_POLICY=PASSIVE, ORT "
        "allow_spinning=0): on a shared machine other processes then cannot inflate the "
        "timings 10-40x through spin-waiting thread pools",
    )
    parser.add_argument("--output", default=None, help="also write the table to this file")
    parser.add_argument("--json", default=None, help="also write the raw results as JSON")
    parser.add_argument("--workdir", default=None, help="keep weights and ONNX files here")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    configs = [c for c in args.configs.split(",") if c]
    for name, values, allowed in (
        ("--models", models, ("ssdlite", "lraspp")),
        ("--configs", configs, CONFIGS),
    ):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            parser.error(f"{name}: unknown {bad or values}; choose from {', '.join(allowed)}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    rows = run_benchmark(
        models,
        batches,
        configs,
        iters=args.iters,
        warmup=args.warmup,
        threads=args.threads,
        seg_size=args.seg_size,
        det_size=args.det_size,
        seg_iters=args.seg_iters,
        calib_images=args.calib_images,
        subprocesses=not args.in_process,
        passive=args.passive,
        workdir=args.workdir,
        log=lambda s: print(s, file=sys.stderr),
        rounds=args.rounds,
    )
    table = markdown_table(rows, args.threads)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=list))
    return 0


if __name__ == "__main__":
    sys.exit(main())
