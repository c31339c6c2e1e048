"""The `refiner` command line."""

from refiner.cli.main import main

__all__ = ["main"]
