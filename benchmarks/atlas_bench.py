"""`refiner atlas --consistency none` against pytorch-cka and torch-cka, side by side in one run.

Two torchvision resnet18 (untrained weights, seeds 0 and 1: they time as trained ones do) at 224 px, N images of an
imagefolder's test split, every block output of each net (layer1.0 ... layer4.1). Each tool runs in a fresh process
on the same images, preprocessing and minibatches (refiner's equal-size batches), so where the estimators are the
same one (both peers and refiner's grid are the unbiased minibatch CKA) the values should agree to float precision.
Reported per run: wall time, peak RSS, largest |CKA difference| to refiner's grid, and the ratio to the limit: two
bare forward passes over the same images.

The peers are never project dependencies: install them beside the project, e.g.
    pip install --target PEERS_DIR --no-deps pytorch-cka==1.1.3 torch-cka==0.21
and pass --peers PEERS_DIR (it is put on the peers' PYTHONPATH only).

    python benchmarks/atlas_bench.py --data DIR --images 1000 --threads 2 --peers PEERS_DIR --out bench-atlas/
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYERS = [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]

# One tool's run in a fresh process: prints one JSON line {"seconds": ..., "cka": [[...]]} (timing excludes imports and set-up).
_CHILD = r"""
import json, sys, time
import numpy as np, torch
from torch.utils.data import DataLoader, Dataset
from refiner.layermap.stream import batch_sizes
from refiner.data.datasets import ImageDataset
from refiner.data.tasks import load_task
from refiner.models.checkpoints import load_checkpoint

tool, folder, data_dir, n, batch, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
layers = json.loads(sys.argv[7])
torch.set_num_threads(threads)
a = load_checkpoint(f"{folder}/a.pt", arch="resnet18")
b = load_checkpoint(f"{folder}/b.pt", arch="resnet18")
samples = load_task("imagefolder", data_dir, target=False).test
picked = np.sort(np.random.default_rng(0).choice(len(samples), n, replace=False)) if len(samples) > n else np.arange(len(samples))
samples = [samples[i] for i in picked]  # the subset `refiner atlas --seed 0` measures


class Images(Dataset):
    def __init__(self):
        self.data = ImageDataset(samples, sorted({s.label for s in samples}), a.meta.preprocess)
    def __len__(self):
        return len(self.data)
    def __getitem__(self, i):
        return self.data[i]


starts = np.cumsum([0, *batch_sizes(n, batch)])
loader = DataLoader(Images(), batch_sampler=[list(range(s, e)) for s, e in zip(starts[:-1], starts[1:])], num_workers=0)
net_a, net_b = a.model.eval(), b.model.eval()
t0 = time.perf_counter()
cka = None
if tool == "bare":
    with torch.inference_mode():
        for x, _ in loader:
            net_a(x)
            net_b(x)
elif tool == "ort-bare":  # the floor of refiner's onnxruntime path: both captured trunks through onnxruntime, nothing else
    from pathlib import Path
    from refiner.engine.ortforward import choose_forward
    from refiner.layermap.stream import capture_model
    first = next(iter(loader))[0]
    runs = [choose_forward(capture_model(n, layers, None), layers, first, torch.device("cpu"), "onnxruntime", Path(folder) / "onnx", "net", threads)
            for n in (net_a, net_b)]  # exported (or read from the cache) before the clock starts
    t0 = time.perf_counter()
    for x, _ in loader:
        runs[0](x)
        runs[1](x)
elif tool == "pytorch-cka":
    from cka import compute_cka
    cka = compute_cka(net_a, net_b, loader, layers=layers, model2_layers=layers, device="cpu", progress=False)[0]
elif tool == "torch-cka":
    from torch_cka import CKA
    tc = CKA(net_a, net_b, model1_name="A", model2_name="B", model1_layers=layers, model2_layers=layers, device="cpu")
    tc.compare(loader)
    cka = tc.export()["CKA"]
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "cka": None if cka is None else torch.as_tensor(cka).double().tolist()}))
"""


def _run(cmd: list[str], env: dict[str, str]) -> tuple[str, float, float]:
    """Run a child; (its stdout, wall seconds, its own peak RSS in MiB, from wait4)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{err.read()[-3000:]}")
        return out.read(), wall, usage.ru_maxrss / 1024


def main() -> None:
    import numpy as np
    import torch

    from refiner.models.architectures import create_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="imagefolder with train/ and test/ (e.g. CIFAR-10 as JPEG)")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peers", type=Path, help="folder with pytorch-cka and torch-cka installed (pip --target); without it only refiner and the bare passes run")
    p.add_argument("--tools", default="bare,ort-bare,refiner,refiner-torch,refiner-positions,pytorch-cka,torch-cka", help="comma-separated runs, in order")
    p.add_argument("--reps", type=int, default=1, help="rounds of every tool, alternating; min and median reported")
    p.add_argument("--out", required=True, type=Path, help="folder for the nets, the atlas reports and results.json")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, seed in (("a.pt", 0), ("b.pt", 1)):
        if not (args.out / name).exists():
            torch.manual_seed(seed)
            torch.save(create_model("resnet18", 1000).state_dict(), args.out / name)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    peer_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(args.peers or ""), env.get("PYTHONPATH", "")]))}
    runs: dict[str, list[dict]] = {}
    for rep in range(args.reps):  # every tool once per round, so that drift in the machine's load falls on all alike
        for tool in args.tools.split(","):
            if tool not in ("bare", "ort-bare") and not tool.startswith("refiner") and args.peers is None:
                continue
            runs.setdefault(tool, []).append(_one(tool, args, env, peer_env))
            r = runs[tool][-1]
            print(f"round {rep} {tool}: {r['measured_s']:.1f} s measured, {r['wall_s']:.1f} s wall, {r['peak_rss_mib']:.0f} MiB peak RSS", file=sys.stderr)
    results = {tool: {**min(rs, key=lambda r: r["measured_s"]), "median_s": statistics.median(r["measured_s"] for r in rs),
                      "reps": [r["measured_s"] for r in rs]} for tool, rs in runs.items()}  # fmt: skip
    reference = next((np.array(results[t]["cka"], dtype=float) for t in ("refiner", "refiner-positions") if t in results), None)
    bare = results.get("bare", {}).get("measured_s")
    for tool, r in results.items():
        if r.get("cka") is not None and reference is not None:
            r["max_abs_diff_to_refiner"] = float(np.nanmax(np.abs(np.array(r["cka"], dtype=float) - reference)))
        if bare:
            r["ratio_to_bare"] = r["measured_s"] / bare
    meta = {"images": args.images, "batch_size": args.batch_size, "threads": args.threads, "layers": LAYERS, "load_avg": os.getloadavg(),
            "torch": torch.__version__, "cpu": _cpu()}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(_table(results))


def _one(tool: str, args: argparse.Namespace, env: dict[str, str], peer_env: dict[str, str]) -> dict:
    """One run of one tool in a fresh process: its measured and wall seconds, peak RSS and CKA grid."""
    if tool.startswith("refiner"):
        folder = args.out / f"atlas-{tool}"
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        cmd = [sys.executable, "-m", "refiner", "atlas", "--a", str(args.out / "a.pt"), "--arch-a", "resnet18", "--b", str(args.out / "b.pt"),
               "--arch-b", "resnet18", "--task", "imagefolder", "--data", str(args.data), "--layers-a", ",".join(LAYERS),
               "--layers-b", ",".join(LAYERS), "--images", str(args.images), "--batch-size", str(args.batch_size), "--device", "cpu",
               "--threads", str(args.threads), "--consistency", "none", "--position-cka", "on" if tool == "refiner-positions" else "off",
               "--forward", "torch" if tool == "refiner-torch" else "onnxruntime", "--cache", str(args.out / "cache"),
               "--quiet", "--json", "--out", str(folder)]  # fmt: skip
        stdout, wall, rss = _run(cmd, env)
        report = json.loads(stdout)
        return {"wall_s": wall, "measured_s": report["seconds"]["total"], "forward_s": report["seconds"]["forward"],
                "cka_s": report["seconds"]["cka"], "peak_rss_mib": rss, "cka": report["cka"]}  # fmt: skip
    cmd = [sys.executable, "-c", _CHILD, tool, str(args.out), str(args.data), str(args.images), str(args.batch_size), str(args.threads), json.dumps(LAYERS)]
    stdout, wall, rss = _run(cmd, peer_env if tool not in ("bare", "ort-bare") else env)
    line = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "measured_s": line["seconds"], "peak_rss_mib": rss, "cka": line["cka"]}


def _cpu() -> str:
    from refiner.engine.device import Runtime

    return str(Runtime.resolve().record()["name"])


def _table(results: dict[str, dict]) -> str:
    rows = ["| run | min time (s) | median (s) | of which forward / CKA (s) | × two bare passes | peak RSS (MiB) | max abs CKA diff to refiner |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for tool, r in results.items():
        split = f"{r['forward_s']:.1f} / {r['cka_s']:.1f}" if "forward_s" in r else "-"
        ratio = f"{r['ratio_to_bare']:.2f}" if "ratio_to_bare" in r else "-"
        diff = f"{r['max_abs_diff_to_refiner']:.1e}" if "max_abs_diff_to_refiner" in r else "-"
        rows.append(f"| {tool} | {r['measured_s']:.1f} | {r['median_s']:.1f} | {split} | {ratio} | {r['peak_rss_mib']:.0f} | {diff} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
