"""Registers the `refiner analyze <name>` sub-commands."""

from __future__ import annotations

__all__ = ["register"]


def register(sub, command, add_task) -> None:
    """Add one sub-parser per analysis; `command(sub, name, help, examples)` makes a parser."""
