"""`python -m serving`: the server alone, without refiner or torch (what the container runs).

Settings come from REFINER_SERVE_* variables (serving/settings.py); the flags
here override the repository, address, worker count, device and model control.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from serving.app import serve
from serving.settings import ServeSettings, settings_error


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m serving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n  python -m serving --models models/\n"
            "  REFINER_SERVE_MAX_QUEUE_DELAY_MS=5 python -m serving --host 0.0.0.0 --workers 2\n"
            "  python -m serving --models models/ --model-control poll --poll-s 5\n"
        ),
    )
    p.add_argument("--models", type=Path, help="model repository folder (default: $REFINER_SERVE_MODELS, else models/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--workers", type=int, help="server processes sharing the port (default: $REFINER_SERVE_WORKERS, else 1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="onnxruntime device (default: $REFINER_SERVE_DEVICE, else auto)")
    p.add_argument(
        "--model-control", choices=["none", "poll", "explicit"],
        help="as Triton's: none, poll (load new versions every --poll-s s) or explicit (the load/unload API) "
        "(default: $REFINER_SERVE_MODEL_CONTROL, else none)",
    )  # fmt: skip
    p.add_argument("--poll-s", type=float, help="seconds between repository scans under poll (default: $REFINER_SERVE_POLL_S, else 15)")
    args = p.parse_args(argv)
    flags = {"models": args.models, "workers": args.workers, "device": args.device, "model_control": args.model_control, "poll_s": args.poll_s}
    try:
        settings = ServeSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        print(f"error: {settings_error(e)}", file=sys.stderr)
        return 2
    if not settings.models.is_dir():
        print(f"error: model repository {str(settings.models)!r} is not a folder; pass --models DIR", file=sys.stderr)
        return 2
    serve(settings, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
