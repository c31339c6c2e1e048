"""Server memory across load / unload cycles of a large model, with slow clients present (issue 25).

`python -m serving --model-control explicit` runs in its own process on a hand-made ONNX model of
--model-mb MB of float32 weights (all used: (N, 3, 4, 4) -> a hidden layer -> 3 logits). While the
cycles run, --slow clients keep infer requests open whose bodies trickle in a byte at a time (each
waits for its body, so none may hold a version), and one client sends real requests back to back.
Each cycle is unload then load; the server's RSS (/proc/PID/status VmRSS) is read after each.

Reported: RSS before the first cycle, after each, the peak, and the growth over the model's size.
The bound to meet: RSS stays within about two copies of the model above the server's own footprint.

    python benchmarks/serve_memory.py --model-mb 100 --cycles 50 --slow 8 --out bench-memory/
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the artifact builder the tests use
from serving_support import crafted_artifact, rss_mib, stalled_upload  # noqa: E402


def _steady_client(url: str, stop: threading.Event, counts: dict[int, int]) -> None:
    x = np.zeros((1, 3, 4, 4), np.float32)
    body = {"inputs": [{"name": "input", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            try:
                code = client.post(f"{url}/v2/models/big/infer", json=body).status_code
            except httpx.HTTPError:
                code = -1
            counts[code] = counts.get(code, 0) + 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-mb", type=float, default=100)
    p.add_argument("--cycles", type=int, default=50)
    p.add_argument("--slow", type=int, default=8, help="slow clients holding requests open")
    p.add_argument("--out", type=Path, help="folder for results.json")
    args = p.parse_args()
    repo = Path(tempfile.mkdtemp()) / "models"
    hidden = int(args.model_mb * 1024 * 1024 / 4 / 51)  # 48 x hidden + hidden x 3 floats
    folder = crafted_artifact(repo, "big", hidden=hidden, max_batch_size=4)
    model_mib = (folder / "model.onnx").stat().st_size / 2**20
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "REFINER_SERVE_BODY_TIMEOUT_S": "30", "REFINER_SERVE_INTRA_OP_THREADS": "1"}
    cmd = [sys.executable, "-m", "serving", "--models", str(repo), "--port", str(port), "--model-control", "explicit", "--device", "cpu"]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    stop, counts = threading.Event(), {}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
            time.sleep(0.2)
        threads = [threading.Thread(target=stalled_upload, args=(port, stop, 0.5), daemon=True) for _ in range(args.slow)]
        threads.append(threading.Thread(target=_steady_client, args=(url, stop, counts), daemon=True))
        for t in threads:
            t.start()
        time.sleep(1)
        before = rss_mib(server.pid)
        after = []
        t0 = time.perf_counter()
        for i in range(args.cycles):
            assert httpx.post(f"{url}/v2/repository/models/big/unload", timeout=120).status_code == 200
            if i == 0:
                time.sleep(0.5)  # the retired version closes once its requests are answered
                unloaded = rss_mib(server.pid)
            assert httpx.post(f"{url}/v2/repository/models/big/load", timeout=120).status_code == 200
            after.append(rss_mib(server.pid))
            print(f"cycle {i + 1}: RSS {after[-1]:.0f} MiB", file=sys.stderr)
        seconds = time.perf_counter() - t0
    finally:
        stop.set()
        server.terminate()
        server.wait(30)
    result = {
        "model_mib": model_mib, "cycles": args.cycles, "slow_clients": args.slow, "rss_before_mib": before, "rss_unloaded_mib": unloaded,
        "rss_after_mib": after, "rss_peak_mib": max(after), "rss_last_mib": after[-1],
        "growth_over_model": (max(after) - before) / model_mib, "peak_over_unloaded_in_models": (max(after) - unloaded) / model_mib, "seconds_per_cycle": seconds / args.cycles,
        "steady_client_statuses": counts,
    }  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(
        f"model {model_mib:.0f} MiB; RSS before {before:.0f} MiB, with the model unloaded {unloaded:.0f}, after the first cycle {after[0]:.0f}, peak {max(after):.0f}, "
        f"last {after[-1]:.0f} MiB; peak growth {result['growth_over_model']:.2f} x the model, "
        f"peak above the unloaded server {result['peak_over_unloaded_in_models']:.2f} models; "
        f"{result['seconds_per_cycle']:.2f} s per cycle; steady client statuses {counts}"
    )


if __name__ == "__main__":
    main()
