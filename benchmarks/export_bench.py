"""One refined model exported as fp32, fp16 and INT8 ONNX: onnxruntime speed per batch size, and INT8's accuracy.

    python benchmarks/export_bench.py --refined models/NAME/1/refined.pt --task cifar-animal --data DIR --threads 1

Each precision is exported with `refiner export`'s own code (export_artifact)
into a temporary repository. onnxruntime (ENABLE_ALL, CPU provider, the given
intra-op threads) then runs each at batch 1, 8 and 32: median latency over
`--runs` calls after a warm-up, images/s, and the ratio to fp32. INT8's top-1
agreement with fp32 and its accuracy drop on test images come from the export
check that metadata.json records.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from refiner.refine.publish import ExportOptions, export_artifact
from refiner.refine.refined import load_refined

BATCHES = (1, 8, 32)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _median_ms(session, x: np.ndarray, runs: int) -> float:
    for _ in range(5):
        session.run(None, {"input": x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, {"input": x})
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refined", type=Path, required=True, help="a build's refined.pt")
    parser.add_argument("--task", required=True, help="the task it was built for (INT8 calibration and scoring)")
    parser.add_argument("--data", type=Path, help="dataset folder of the task")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default: 1)")
    parser.add_argument("--runs", type=int, default=50, help="timed calls per point (default: 50)")
    args = parser.parse_args()

    model, spec = load_refined(args.refined)
    precisions = {"fp32": ExportOptions(), "fp16": ExportOptions(fp16=True), "int8": ExportOptions(quantize="int8", max_int8_drop=100)}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths, metas = {}, {}
        for name, options in precisions.items():
            out = export_artifact(model, spec, Path(tmp), name, options, args.task, args.data)
            paths[name], metas[name] = out.folder / "model.onnx", out.metadata
        print(f"{args.refined}: input {spec.preprocess.input_size}, {len(spec.class_names)} classes, {args.threads} onnxruntime thread(s)")
        print(f"{'precision':>9} {'batch':>5} {'ms/call':>9} {'images/s':>10} {'vs fp32':>8}  file MB")
        base = {}
        for name, path in paths.items():
            session = _session(path, args.threads)
            for batch in BATCHES:
                x = rng.standard_normal((batch, *spec.preprocess.input_size), dtype=np.float32)
                ms = _median_ms(session, x, args.runs)
                base.setdefault(batch, ms) if name == "fp32" else None
                print(f"{name:>9} {batch:>5} {ms:9.3f} {1000 * batch / ms:10.0f} {base[batch] / ms:7.2f}x  {path.stat().st_size / 1e6:.2f}")
        q = metas["int8"].quantization
        print(
            f"INT8: calibrated on {q['calibration_images']} validation images; on {q['test_images']} test images top-1 agreement "
            f"{q['top1_agreement']:.1%}, accuracy {100 * q['accuracy_fp32']:.2f} -> {100 * q['accuracy_int8']:.2f} "
            f"({-q['accuracy_drop_points']:+.2f} points); fp16 max |logit diff| {metas['fp16'].export_check['max_abs_diff']:.2e}"
        )


if __name__ == "__main__":
    main()
