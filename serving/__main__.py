"""`python -m serving`: the server alone, without refiner or torch (what the container runs).

Settings come from REFINER_SERVE_* variables (serving/settings.py); the flags
here override them (serving/flags.py, shared with `refiner serve`).
"""

from __future__ import annotations

import argparse
import sys

from serving.app import serve
from serving.flags import EPILOG, FlagError, add_flags, settings_from_flags


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m serving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n  python -m serving --models models/\n"
            "  REFINER_SERVE_MAX_QUEUE_DELAY_MS=5 python -m serving --host 0.0.0.0 --workers 2\n"
            "  python -m serving --models models/ --model-control poll --poll-s 5\n"
            "  python -m serving --host 0.0.0.0 --model-control explicit --api-key-file /run/secrets/refiner-key\n\n" + EPILOG
        ),
    )
    add_flags(p)
    args = p.parse_args(argv)
    try:
        settings = settings_from_flags(args)
    except FlagError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not settings.models.is_dir():
        print(f"error: model repository {str(settings.models)!r} is not a folder; pass --models DIR", file=sys.stderr)
        return 2
    serve(settings, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
