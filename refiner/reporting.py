"""Human-readable tables, plots and HTML pages of the figures refiner measures."""

from __future__ import annotations

from refiner.metrics import VarianceTable

__all__ = ["format_variance_table"]


def format_variance_table(tables: dict[str, VarianceTable]) -> str:
    """Plain-text Var table, one row per split (paper Table 1/2 layout)."""
    orders = len(next(iter(tables.values())).var_orders)
    head = ["split", *(f"Var(x^({k}))" for k in range(orders)), "Var(x^D)", "Var(x_B)", "instab.", "CKA", "images"]
    rows = [
        [split, *(f"{v:.4f}" for v in t.var_orders), f"{t.var_delta:.4f}", f"{t.var_target:.4f}", f"{t.instability:.4f}", f"{t.cka:.4f}", str(t.images)]
        for split, t in tables.items()
    ]
    return _format_rows(head, rows)


def _format_rows(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])
