"""`refiner analyze`: the paper's other applications (diagnose, stability, compression, distillation)."""

from __future__ import annotations

from refiner.cli import options

__all__ = ["register"]


def register(sub) -> None:
    from refiner.analyses.commands import register as register_analyses

    p = options.command(
        sub,
        "analyze",
        "The paper's other applications as reports: diagnose, stability, compression, distillation.",
        "  refiner analyze stability --models a.pt b.pt c.pt --task digits --out reports/stability\n"
        "  refiner analyze diagnose --weak a.pt --strong b.pt --task digits --out reports/diagnose\n",
    )
    register_analyses(
        p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS"),
        options.command, options.add_task, options.add_g, options.g_configs, options.runtime, options.add_net_names, options.load_fed,
    )  # fmt: skip
