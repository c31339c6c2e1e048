"""Rerun the protocol table of docs/benchmarks.md: what Delta removal does on CIFAR-10, with controls.

Grid: base data (balanced, or non-target classes over-represented 4x) x layer
(before BN, after ReLU) x protocol (paper, sound), with g converged (refiner's
default); at the default layer (before BN) also with g fitted for 10 epochs,
to show whether convergence changes the verdict. Base nets are small_vgg in the paper's regime (no augmentation,
trained to training CE <= 0.02), A and B from different seeds. Each step is a
`refiner` command run in a subprocess; finished steps are skipped on a rerun.

    python benchmarks/protocols.py --data CIFAR_ROOT --out runs/protocols --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

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
        _wait_for(step.needs, makers)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        start = time.perf_counter()
        with step.log.open("w") as f:
            code = subprocess.call(step.cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    finally:
        lock.unlink(missing_ok=True)
    if code:
        raise SystemExit(f"failed ({code}): {' '.join(step.cmd)}\nsee {step.log}")
    print(f"[{time.perf_counter() - start:7.0f} s] {step.log.stem}", flush=True)


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
    p.add_argument("--data", required=True, type=Path, help="CIFAR-10 root (train/, test/ of class folders)")
    p.add_argument("--out", required=True, type=Path, help="working folder: nets, g files, builds, logs, table.md")
    p.add_argument("--grid", choices=["full", "reduced"], default="full",
                   help="full: every base x layer x protocol; reduced: post-ReLU and the 10-epoch g on balanced data only (default: full)")
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
    args = p.parse_args()
    out, refiner = args.out, [sys.executable, "-m", "refiner"]
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cache = ["--cache", str(out / "cache"), "--device", "cpu"]
    data = ["--task", TASK, "--data", str(args.data), "--train-per-class", str(args.per_class)]
    nets = {(base, seed): out / f"{base}-s{seed}.pt" for base, seed in product(BASES, (0, 1))}

    steps = [
        Step([*refiner, "train", "--arch", "small_vgg", *data, "--regime", "paper", "--epochs", str(args.net_epochs),
              "--seed", str(seed), *BASES[base], "--out", str(net), "--device", "cpu"],  # fmt: skip
             out / "logs" / f"train-{base}-s{seed}.log", net)
        for (base, seed), net in nets.items()
    ]
    grid = [
        (base, layer, g_kind)
        for base, layer, g_kind in product(BASES, LAYERS, ("converged", "short"))
        if (g_kind == "converged" or layer == "pre-BN") and (args.grid == "full" or base == "balanced" or (layer, g_kind) == ("pre-BN", "converged"))
    ]
    for base, layer, g_kind in grid:
        g = out / f"g-{base}-{layer}-{g_kind}.pt"
        budget = ["--g-epochs", str(args.short_g_epochs), "--g-lr", "1e-2", "1e-4"] if g_kind == "short" else []
        if g_kind == "converged" and args.g_steps:
            budget = ["--g-steps", str(args.g_steps)]
        cmd = [*refiner, "fit", "--a", str(nets[base, 0]), "--b", str(nets[base, 1]), *data, *cache,
               "--on", "target", "--layer-a", LAYERS[layer], "--layer-b", LAYERS[layer], "--test-per-class",
               str(args.test_per_class), *budget, "--out", str(g)]  # fmt: skip
        steps.append(Step(cmd, out / "logs" / f"fit-{base}-{layer}-{g_kind}.log", g, [nets[base, 0], nets[base, 1]]))
    reports = {}
    for (base, layer, g_kind), protocol in product(grid, ("paper", "sound")):
        name = f"{base}-{layer}-{g_kind}-{protocol}"
        g = out / f"g-{base}-{layer}-{g_kind}.pt"
        epochs = args.paper_epochs if protocol == "paper" else args.sound_epochs
        cmd = [*refiner, "build", "--a", str(nets[base, 0]), "--b", str(nets[base, 1]), *data, *cache,
               "--test-per-class", str(args.test_per_class), "--g", str(g), "--protocol", protocol,
               "--head-epochs", str(epochs), "--seeds", str(args.seeds), "--no-ablations",
               "--name", name, "--models", str(out / "models")]  # fmt: skip
        report = out / "models" / name / "1" / "report.json"
        steps.append(Step(cmd, out / "logs" / f"build-{name}.log", report, [g]))
        reports[base, layer, g_kind, protocol] = report
    _run_all(steps, args.jobs, args.threads)

    table = _table(reports)
    (out / "table.md").write_text(table)
    print(table)


def _ms(values: list[float], scale: float = 100.0) -> str:
    return f"{scale * statistics.fmean(values):.1f} ± {scale * statistics.pstdev(values):.1f}"


def _diff(t: dict | None) -> str:
    if t is None:
        return "—"
    ci = f"{100 * t['ci95'][0]:+.1f} to {100 * t['ci95'][1]:+.1f}" if t["ci95"] else "no CI"
    return f"{100 * t['mean']:+.1f} ({ci}, p {t['p_value']:.2g}): {t['verdict']}"


def _table(reports: dict[tuple[str, str, str, str], Path]) -> str:
    """One row per build and variant: figures over seeds and the paired verdicts of the refined model against it."""
    lines = [
        "| base data | layer | g | protocol | variant | acc, target classes | acc, all outputs | best on test (optimistic) "
        "| test CE, target | refined − this, target acc (95% CI, p) | refined − this, all outputs |",
        "|---|---|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for (base, layer, g_kind, protocol), path in reports.items():
        r = json.loads(path.read_text())
        fit = r["comparison"]["fit"]
        g_desc = f"{g_kind}: {fit['total_steps']} steps, held-out MSE {min(fit['holdout_mse']):.3f}"
        tests = {(t["baseline"], t["metric"]): t for t in r["paired"]}
        for v in r["variants"]:
            best = _ms(v["best_test_acc"]) if v["best_test_acc"] else "—"
            full = _ms(v["test_acc"]) if protocol == "paper" else "(= target)"
            full_diff = _diff(tests.get((v["features"], "acc"))) if protocol == "paper" else "(= target)"
            lines.append(
                f"| {base} | {layer} | {g_desc} | {protocol} | {v['features']} | {_ms(v['test_acc_target'])} | {full} | {best} "
                f"| {statistics.fmean(v['test_ce_target']):.3f} | {_diff(tests.get((v['features'], 'acc_target')))} | {full_diff} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
