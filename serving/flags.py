"""The server's command-line flags, shared by `python -m serving` and `refiner serve`: each one overrides its
REFINER_SERVE_* variable (serving/settings.py), which overrides the built-in default."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # read only when flags become settings: `--help` stays light
    from serving.settings import ServeSettings

__all__ = ["EPILOG", "add_flags", "settings_from_flags", "FlagError"]

EPILOG = """\
the restricted API (as Triton's --http-restricted-api):
  without a key, every endpoint is open to whoever reaches the port: the repository index (model names,
  versions, why a version was refused), and with --model-control explicit, load and unload of any model.
  With --api-key-file (or REFINER_SERVE_API_KEY), the APIs of --restricted-api (default: model-repository)
  answer 401 unless the request carries the header x-refiner-key: KEY. Health is never restricted.
  Serving explicit model control on a non-loopback address without a key logs a warning at start-up.

a repository not fully trusted:
  each model is read on its own; one that cannot be read or lies about what it serves (wrong batching,
  external data, over the batch limits) is listed UNAVAILABLE in the repository index with its reason and
  logged once, and the others serve. --exit-on-error fails the start instead; --strict-readiness keeps
  /v2/health/ready at 400 unless every model found is served (default: ready once one model serves).
"""


class FlagError(ValueError):
    """Flags that make no valid settings, in one line."""


def add_flags(p: argparse.ArgumentParser) -> None:
    """The flags; each defaults to None (its REFINER_SERVE_* variable, else the built-in default)."""
    p.add_argument("--models", type=Path, help="model repository folder (default: $REFINER_SERVE_MODELS, else models/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--workers", type=int, help="server processes sharing the port, cores split between them (default: 1)")
    p.add_argument("--device", dest="serve_device", choices=["auto", "cpu", "cuda"],
                   help="onnxruntime device: auto takes CUDA when onnxruntime-gpu sees a GPU (default: auto)")  # fmt: skip
    p.add_argument(
        "--model-control", choices=["none", "poll", "explicit"],
        help="as Triton's: none reads the repository once; poll loads new versions and models every --poll-s seconds; "
        "explicit adds POST /v2/repository/models/NAME/load and /unload (one worker) (default: none)",
    )  # fmt: skip
    p.add_argument("--poll-s", type=float, help="seconds between repository scans with --model-control poll (default: 15)")
    p.add_argument("--grpc-port", type=int, help="also serve the protocol's gRPC half (KServe v2 / Triton) on this port, on --host (default: off)")
    p.add_argument("--api-key-file", type=Path, help="file holding the key of the restricted API (its first line); see below")
    p.add_argument("--restricted-api", metavar="APIS",
                   help="comma-separated APIs that need the key: model-repository, inference, metadata, metrics (default: model-repository)")  # fmt: skip
    p.add_argument("--exit-on-error", action="store_const", const=True, help="fail the start when any model is refused")
    p.add_argument("--strict-readiness", action="store_const", const=True, help="ready only while every model found is served")
    p.add_argument("--max-batch-size", type=int, help="the most rows a model may declare as its max_batch_size (default: 256)")
    p.add_argument("--load-timeout-s", type=float, help="seconds to read, open and warm up one version before it is refused (default: 60)")


def settings_from_flags(args: argparse.Namespace) -> ServeSettings:
    """The settings the flags and the environment give; FlagError saying what is wrong."""
    from pydantic import ValidationError

    from serving.settings import ServeSettings, settings_error

    flags = {
        "models": args.models, "workers": args.workers, "device": args.serve_device, "model_control": args.model_control,
        "poll_s": args.poll_s, "exit_on_error": args.exit_on_error, "strict_readiness": args.strict_readiness,
        "max_batch_size": args.max_batch_size, "load_timeout_s": args.load_timeout_s, "grpc_port": args.grpc_port,
        "grpc_host": args.host if args.grpc_port is not None else None,
    }  # fmt: skip
    if args.api_key_file is not None:
        try:
            lines = args.api_key_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise FlagError(f"--api-key-file {str(args.api_key_file)!r} cannot be read: {e}") from None
        if not lines or not lines[0].strip():
            raise FlagError(f"--api-key-file {str(args.api_key_file)!r} is empty; expected the key on its first line")
        flags["api_key"] = lines[0].strip()
    if args.restricted_api is not None:
        flags["restricted_apis"] = [a.strip() for a in args.restricted_api.split(",")]
    try:
        return ServeSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        raise FlagError(settings_error(e)) from None
