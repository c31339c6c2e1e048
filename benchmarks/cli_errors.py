"""CPU time of the command line's refusals (issue 26): each bad input answered before torch is imported, against --help.

Each case runs `python -m refiner ...` in a fresh process, --reps times; reported: the median CPU time (user + system,
from wait4) and wall time, whether torch was imported, and the error line. Files and folders are made in a temporary
folder (two checkpoint files, an imagefolder of two empty classes).

    python benchmarks/cli_errors.py --reps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('TORCH', 'torch' in sys.modules, file=sys.stderr))\n"
    "from refiner.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
)
CASES = {
    "--help": ["build", "--help"],
    "missing checkpoint": ["build", "--a", "nope.pt", "--b", "b.pt", "--task", "digits"],
    "misspelt task": ["build", "--a", "a.pt", "--b", "b.pt", "--task", "digitz"],
    "resnet81": ["atlas", "--a", "a.pt", "--arch-a", "resnet81", "--b", "b.pt", "--task", "digits", "--out", "atlas"],
    "wrong --task for the folder": ["build", "--a", "a.pt", "--b", "b.pt", "--task", "cifar10", "--data", "photos"],
    "unknown --classes entry": ["fit", "--a", "a.pt", "--b", "b.pt", "--task", "imagefolder", "--data", "photos", "--classes", "cat,dgo", "--out", "g.pt"],
}  # fmt: skip


def _run(argv: list[str], cwd: Path) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _PROBE, *argv], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, _, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    return usage.ru_utime + usage.ru_stime, wall, proc.stderr.read()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("a.pt", "b.pt"):
            (root / name).write_bytes(b"weights")
        for split in ("train", "test"):
            for c in ("cat", "dog"):
                (root / "photos" / split / c).mkdir(parents=True)
        print("| case | CPU s (median) | wall s (median) | torch imported | answer |")
        print("|---|---:|---:|---|---|")
        for case, argv in CASES.items():
            runs = [_run(argv, root) for _ in range(args.reps)]
            err = runs[-1][2]
            line = next((x for x in err.splitlines() if ": error: " in x), "(help text)")
            torch = "TORCH True" in err
            print(f"| {case} | {statistics.median(r[0] for r in runs):.2f} | {statistics.median(r[1] for r in runs):.2f} | {torch} | {line[:110]} |")


if __name__ == "__main__":
    main()
