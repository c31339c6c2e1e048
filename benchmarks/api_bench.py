"""The atlas from Python against the command line: `refiner.atlas(...)` on a DataLoader, `refiner atlas` in a process.

Two torchvision resnet18 (untrained, seeds 0 and 1) at 224 px, every block output of each net (8 x 8 pairs),
`--consistency none --position-cka off`, CPU, on every test image of an imagefolder, in batches that divide it
(so the CLI's equal-size minibatches and the DataLoader's batches are the same images). Three ways, each rep in a
fresh process, alternating, so that drift in the machine's load falls on all three alike:

- cli: `python -m refiner atlas ...` as a user types it (wall time, imports included, and its own measured total);
- cli-inprocess: `refiner.cli.main.main([...])` called in Python (timed from the call: load, atlas, save);
- api: `refiner.atlas(refiner.load(a), refiner.load(b), refiner.loader(...))` then `.save(dir)` (timed likewise).

Reported: min and median seconds over the reps, the API's ratio to the CLI in-process (the same work through
two front doors: the ratio should be 1), and the largest |CKA difference| between the grids.

    python benchmarks/api_bench.py --data DIR --batch-size 32 --threads 1 --reps 3 --out bench-api/
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LAYERS = [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]

# One in-process run in a fresh interpreter: prints one JSON line {"seconds": ..., "cka": [[...]]}.
_CHILD = r"""
import json, sys, time
mode, folder, data, batch, threads, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
layers = json.loads(sys.argv[7])
import numpy as np
import refiner
from refiner.cli.main import main

t0 = time.perf_counter()
if mode == "cli-inprocess":
    code = main(["atlas", *json.loads(sys.argv[8]), "--quiet", "--out", out])
    assert code in (0, None), code
    cka = json.load(open(f"{out}/atlas.json"))["cka"]
else:
    a = refiner.load(f"{folder}/a.pt", arch="resnet18")
    b = refiner.load(f"{folder}/b.pt", arch="resnet18")
    images = refiner.loader("imagefolder", "test", data=data, preprocess=a.preprocess, batch_size=batch)
    result = refiner.atlas(a, b, images, layers_a=layers, layers_b=layers, consistency="none", positions=False, device="cpu", threads=threads)
    result.save(out)
    cka = np.asarray(result.cka, dtype=float).tolist()
print(json.dumps({"seconds": time.perf_counter() - t0, "cka": cka}))
"""


def _cli_args(folder: Path, data: Path, images: int, batch: int, threads: int) -> list[str]:
    return ["--a", str(folder / "a.pt"), "--arch-a", "resnet18", "--b", str(folder / "b.pt"), "--arch-b", "resnet18",
            "--task", "imagefolder", "--data", str(data), "--split", "test", "--images", str(images),
            "--layers-a", ",".join(LAYERS), "--layers-b", ",".join(LAYERS), "--batch-size", str(batch), "--device", "cpu",
            "--threads", str(threads), "--consistency", "none", "--position-cka", "off"]  # fmt: skip


def _run(cmd: list[str], env: dict[str, str]) -> tuple[str, float]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} failed:\n{done.stderr[-3000:]}")
    return done.stdout, time.perf_counter() - t0


def main() -> None:
    import numpy as np
    import torch

    from refiner.data.tasks import load_task
    from refiner.models.architectures import create_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="imagefolder with train/ and test/; every test image is used")
    p.add_argument("--batch-size", type=int, default=32, help="must divide the number of test images")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", required=True, type=Path, help="folder for the nets, the atlas reports and results.json")
    args = p.parse_args()
    images = len(load_task("imagefolder", args.data, target=False).test)
    if images % args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} does not divide the {images} test images: the CLI's and the loader's batches would differ")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, seed in (("a.pt", 0), ("b.pt", 1)):
        if not (args.out / name).exists():
            torch.manual_seed(seed)
            torch.save(create_model("resnet18", 1000).state_dict(), args.out / name)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    cli = _cli_args(args.out, args.data, images, args.batch_size, args.threads)
    runs: dict[str, list[float]] = {"cli": [], "cli (its own total)": [], "cli-inprocess": [], "api": []}
    grids: dict[str, np.ndarray] = {}
    for rep in range(args.reps):
        for mode in ("cli", "cli-inprocess", "api"):
            out = args.out / f"{mode}-{rep}"
            if mode == "cli":
                stdout, wall = _run([sys.executable, "-m", "refiner", "atlas", *cli, "--quiet", "--json", "--out", str(out)], env)
                report = json.loads(stdout)
                runs["cli"].append(wall)
                runs["cli (its own total)"].append(report["seconds"]["total"])
                grids[mode] = np.array(report["cka"], dtype=float)
            else:
                child = [sys.executable, "-c", _CHILD, mode, str(args.out), str(args.data), str(args.batch_size), str(args.threads), str(out), json.dumps(LAYERS), json.dumps(cli)]
                stdout, _ = _run(child, env)
                line = json.loads(stdout.strip().splitlines()[-1])
                runs[mode].append(line["seconds"])
                grids[mode] = np.array(line["cka"], dtype=float)
            print(f"rep {rep} {mode}: {runs[mode][-1]:.1f} s", file=sys.stderr)
    diff = {m: float(np.nanmax(np.abs(g - grids["cli"]))) for m, g in grids.items()}
    summary = {m: {"min_s": min(v), "median_s": statistics.median(v), "reps": v} for m, v in runs.items()}
    meta = {"images": images, "batch_size": args.batch_size, "threads": args.threads, "reps": args.reps, "layers": LAYERS,
            "load_avg_after": os.getloadavg(), "torch": torch.__version__}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "runs": summary, "max_abs_cka_diff_to_cli": diff}, indent=2))
    rows = ["| run | min (s) | median (s) | max abs CKA diff to the CLI |", "|---|---|---|---|"]
    rows += [f"| {m} | {s['min_s']:.1f} | {s['median_s']:.1f} | {diff.get(m.split(' ')[0], float('nan')):.1e} |" for m, s in summary.items()]
    ratio = summary["api"]["median_s"] / summary["cli-inprocess"]["median_s"]
    print("\n".join(rows) + f"\n\napi / cli-inprocess (median): {ratio:.3f}")


if __name__ == "__main__":
    main()
