"""The `refiner` command line: parses arguments and calls the library (one module per command)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

from refiner.cli import analyze, atlas, build, export, fit, layers, options, serve, train
from refiner.errors import RefinerError

__all__ = ["main"]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refiner",
        description="Compare what two trained networks know and build refined, deployable models from it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `refiner COMMAND --help` for each command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (train, fit, build, export, serve, layers, analyze, atlas):
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    args = parser().parse_args(argv)
    try:
        options.check(args)  # the arguments alone, before torch is imported: a bad value answers at once
        with _command_line_output(getattr(args, "quiet", False)):
            if hasattr(args, "device") and "WORLD_SIZE" in os.environ:
                from refiner.engine.distributed import init_from_env

                args.device = init_from_env(args.device)  # under torchrun: join the group, one GPU per process
            args.run(args)
    except (RefinerError, ValidationError) as e:
        print(f"refiner {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # refiner.errors.Interrupted says what a long run kept
        print(f"refiner {args.command}: interrupted; {e or 'no partial output was written'}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`refiner layers ... | head`): not an error of the command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit does not fail again
        return 0
    return 0


@contextlib.contextmanager
def _command_line_output(quiet: bool) -> Iterator[None]:
    """While a command runs: bars on unless --quiet, the `refiner` logger's records on stderr ("== stage"), only
    warnings and above with --quiet. Put back as they were after, so a command run from Python leaves no handler."""
    import logging

    from refiner import progress

    was_quiet, level, shape = progress._quiet, progress.LOGGER.level, warnings.formatwarning
    handler = progress.CommandLineHandler()
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    progress.set_quiet(quiet)
    progress.LOGGER.addHandler(handler)
    progress.LOGGER.setLevel(logging.INFO)
    # the library's warnings as one plain line each ("warning: ..."), not Python's "file.py:266: UserWarning:" and a source line
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = shape
        progress.LOGGER.removeHandler(handler)
        progress.LOGGER.setLevel(level)
        progress.set_quiet(was_quiet)
