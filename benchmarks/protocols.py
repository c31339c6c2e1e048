"""Rerun the protocol table of docs/benchmarks.md: what Delta removal does on CIFAR-10, with controls, across base-net pairs.

Grid: base data (balanced, or non-target classes over-represented 4x) x layer
(before BN, after ReLU) x protocol (paper, sound), with g converged (refiner's
default); at the default layer (before BN) also with g fitted for 10 epochs,
to show whether convergence changes the verdict. Every row is built for
--pairs independent base-net pairs (pair k: small_vgg from seeds 2k and 2k+1,
in the paper's regime: no augmentation, trained to training CE <= 0.02), so
the between-pair spread stands beside each build's own interval.

Each step is a `refiner` command run in a subprocess. A finished build's
report.json and predictions.npz are copied to --results (small: commit them),
and a build whose results are there is never run again, so the run resumes
across machines and sessions; nets and g are made only for builds still missing.

    python benchmarks/protocols.py --data CIFAR_ROOT --out runs/protocols --results benchmarks/results/protocols --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import protocols_table

TASK = "cifar-animal"
LAYERS = {"pre-BN": "features.10", "post-ReLU": "features.12"}  # small_vgg block 2's last conv, and its ReLU
BASES = {"balanced": [], "imbalanced": ["--imbalance", "4"]}


@dataclass
class Step:
    """One `refiner` command, the files it needs and the file it makes."""

    cmd: list[str]
    log: Path
    out: Path
    needs: list[Path] = field(default_factory=list)
    keep: tuple[Path, Path] | None = None  # (build folder, results folder): report.json and predictions.npz are copied over


def _lock(step: Step) -> Path:
    return step.log.with_suffix(".lock")


def _alive(lock: Path) -> bool:
    """Whether the process that took this lock (its pid is the file's content) still runs."""
    try:
        pid = int(lock.read_text())
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" if Path("/proc").is_dir() else True
    except (ValueError, OSError):
        return False


def _wait_for(paths: list[Path], makers: dict[Path, Path]) -> None:
    """Wait until `paths` exist; fail when the step making one of them (lock in `makers`) is not running."""
    while missing := [p for p in paths if not p.exists()]:
        if not any(makers.get(p, Path("-")).exists() and _alive(makers[p]) for p in missing):
            raise SystemExit(f"nothing is making {', '.join(map(str, missing))}: an earlier step failed")
        time.sleep(5)


def _run(step: Step, threads: int, makers: dict[Path, Path]) -> None:
    """Run a step unless its output exists; a step another live process (pid in its lock) makes is waited for."""
    lock = _lock(step)
    if step.out.exists():
        return
    if lock.exists() and _alive(lock):
        _wait_for([step.out], makers)
        return
    lock.write_text(str(os.getpid()))  # this run makes it: other runs, and steps needing it, wait
    try:
        if step.keep and (step.keep[0] / "predictions.npz").exists():  # built before its results were copied
            _keep(*step.keep)
            return
        if step.keep:
            shutil.rmtree(step.keep[0].parent, ignore_errors=True)  # a build cut short: start its model folder afresh
        _wait_for(step.needs, makers)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        start = time.perf_counter()
        with step.log.open("w") as f:
            code = subprocess.call(step.cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    finally:
        lock.unlink(missing_ok=True)
    if code:
        raise SystemExit(f"failed ({code}): {' '.join(step.cmd)}\nsee {step.log}")
    if step.keep:
        _keep(*step.keep)
    print(f"{step.log.stem}: {time.perf_counter() - start:.0f} s", flush=True)


def _keep(built: Path, kept: Path) -> None:
    """Copy a build's report.json and predictions.npz to the results folder, whole or not at all."""
    tmp = kept.with_name(kept.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(built / "predictions.npz", tmp / "predictions.npz")
    report = json.loads((built / "report.json").read_text())
    report["comparison"]["data_root"] = "CIFAR_ROOT"  # where the data lay on the machine that ran it: not kept
    (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    tmp.rename(kept)


def _run_all(steps: list[Step], jobs: int, threads: int) -> None:
    """Run steps `jobs` at a time, in order; a step starts once the files it needs exist; the first failure stops all."""
    makers = {step.out: _lock(step) for step in steps}
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(_run, step, threads, makers) for step in steps]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in done:
            if future.exception() is not None:
                for other in futures:
                    other.cancel()
                raise future.exception()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="CIFAR-10 root (train/, test/ of class folders); not needed to tabulate finished results")
    p.add_argument("--out", required=True, type=Path, help="working folder: nets, g files, builds, logs")
    p.add_argument("--results", required=True, type=Path, help="per-build report.json + predictions.npz (kept, committed) and table.md")
    p.add_argument("--grid", choices=["full", "reduced"], default="full",
                   help="full: every base x layer x protocol; reduced: post-ReLU and the 10-epoch g on balanced data only (default: full)")
    p.add_argument("--pairs", type=int, default=3, help="independent base-net pairs per row (default: 3)")
    p.add_argument("--only", nargs="*", default=[], help="run only builds whose name contains one of these as whole '-' separated words (e.g. p1 balanced-pre-BN-converged)")
    p.add_argument("--per-class", type=int, default=200, help="training images per class, base nets and heads (default: 200)")
    p.add_argument("--test-per-class", type=int, default=200, help="test images per class scored (default: 200)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per variant (default: 3)")
    p.add_argument("--paper-epochs", type=int, default=100, help="head epochs of the paper protocol (default: 100)")
    p.add_argument("--sound-epochs", type=int, default=20, help="head epochs of the sound protocol (default: 20)")
    p.add_argument("--net-epochs", type=int, default=60, help="epoch budget of the base nets (default: 60)")
    p.add_argument("--short-g-epochs", type=int, default=10, help="epochs of the unconverged g (default: 10)")
    p.add_argument("--g-steps", type=int, help="step budget of the converged g (default: refiner's)")
    p.add_argument("--jobs", type=int, default=1, help="steps run at once (default: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per step (default: 1)")
    p.add_argument("--table-only", action="store_true", help="tabulate the results there are; run nothing")
    args = p.parse_args()
    out, results, refiner = args.out, args.results, [sys.executable, "-m", "refiner"]
    grid = [
        (base, layer, g_kind, protocol)
        for base, layer, g_kind in product(BASES, LAYERS, ("converged", "short"))
        if (g_kind == "converged" or layer == "pre-BN") and (args.grid == "full" or base == "balanced" or (layer, g_kind) == ("pre-BN", "converged"))
        for protocol in ("paper", "sound")
    ]
    names = {(row, k): f"{'-'.join(row)}-p{k}" for row in grid for k in range(args.pairs)}
    missing = [key for key, name in names.items() if not (results / name / "report.json").exists()]
    missing = [key for key in missing if not args.only or any(f"-{o}-" in f"-{names[key]}-" for o in args.only)]  # whole words: not 'imbalanced' for 'balanced'
    missing.sort(key=lambda key: key[1])  # pair by pair: a pair's builds start before the next pair's nets are trained
    if missing and not args.table_only:
        if args.data is None:
            raise SystemExit(f"{len(missing)} builds are missing: give --data to run them, or --table-only")
        _run_all(_steps(args, out, results, refiner, [(row, k, names[row, k]) for row, k in missing]), args.jobs, args.threads)
    table = protocols_table.table(results, grid, args.pairs)
    results.mkdir(parents=True, exist_ok=True)
    (results / "table.md").write_text(table)
    print(table)


def _steps(args, out: Path, results: Path, refiner: list[str], builds: list[tuple[tuple[str, ...], int, str]]) -> list[Step]:
    """The nets, g fits and builds that the missing `builds` need, build by build (a pair's builds before the next pair's nets)."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cache = ["--cache", str(out / "cache"), "--device", "cpu"]
    data = ["--task", TASK, "--data", str(args.data), "--train-per-class", str(args.per_class)]
    net = lambda base, seed: out / f"{base}-s{seed}.pt"  # noqa: E731
    steps: dict[Path, Step] = {}  # by the file each step makes, in the order they are first needed
    for (base, layer, g_kind, protocol), k, name in builds:
        a, b = net(base, 2 * k), net(base, 2 * k + 1)
        for seed, path in ((2 * k, a), (2 * k + 1, b)):
            steps.setdefault(path, Step(
                [*refiner, "train", "--arch", "small_vgg", *data, "--regime", "paper", "--epochs", str(args.net_epochs),
                 "--seed", str(seed), *BASES[base], "--out", str(path), "--device", "cpu"],
                out / "logs" / f"train-{base}-s{seed}.log", path,
            ))  # fmt: skip
        g = out / f"g-{base}-{layer}-{g_kind}-p{k}.pt"
        budget = ["--g-epochs", str(args.short_g_epochs), "--g-lr", "1e-2", "1e-4"] if g_kind == "short" else []
        if g_kind == "converged" and args.g_steps:
            budget = ["--g-steps", str(args.g_steps)]
        steps.setdefault(g, Step(
            [*refiner, "fit", "--a", str(a), "--b", str(b), *data, *cache, "--on", "target", "--layer-a", LAYERS[layer],
             "--layer-b", LAYERS[layer], "--test-per-class", str(args.test_per_class), *budget, "--out", str(g)],
            out / "logs" / f"fit-{g.stem}.log", g, [a, b],
        ))  # fmt: skip
        epochs = args.paper_epochs if protocol == "paper" else args.sound_epochs
        report = out / "models" / name / "1" / "report.json"
        cmd = [*refiner, "build", "--a", str(a), "--b", str(b), *data, *cache,
               "--test-per-class", str(args.test_per_class), "--g", str(g), "--protocol", protocol,
               "--head-epochs", str(epochs), "--seeds", str(args.seeds), "--no-ablations",
               "--name", name, "--models", str(out / "models")]  # fmt: skip
        steps[results / name] = Step(cmd, out / "logs" / f"build-{name}.log", results / name / "report.json", [g], keep=(report.parent, results / name))
    return list(steps.values())


if __name__ == "__main__":
    main()
