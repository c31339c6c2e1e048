"""`refiner serve`: the model repository over HTTP."""

from __future__ import annotations

from pathlib import Path

from refiner.cli import options

__all__ = ["register", "run"]


def register(sub) -> None:
    p = options.command(
        sub,
        "serve",
        "Serve the model repository over HTTP (KServe v2 + image classification).",
        "  refiner serve --models models/\n  refiner serve --models models/ --host 0.0.0.0 --port 8080 --workers 2\n"
        "  refiner serve --models models/ --model-control poll --poll-s 5   # serve new exports without a restart\n",
    )
    p.add_argument("--models", type=Path, default=Path("models"), help="model repository folder (default: models/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--workers", type=int, default=1, help="server processes sharing the port, cores split between them (default: 1)")
    p.add_argument("--device", dest="serve_device", choices=["auto", "cpu", "cuda"], default="auto", help="onnxruntime device: auto takes CUDA when onnxruntime-gpu sees a GPU (default: auto)")
    p.add_argument(
        "--model-control", choices=["none", "poll", "explicit"], default="none",
        help="as Triton's: none reads the repository once; poll loads new versions and models every --poll-s seconds; "
        "explicit adds POST /v2/repository/models/NAME/load and /unload (one worker) (default: none)",
    )  # fmt: skip
    p.add_argument("--poll-s", type=float, default=15.0, help="seconds between repository scans with --model-control poll (default: 15)")
    p.epilog += "\nother settings (limits, timeouts, batching) come from REFINER_SERVE_* variables; see serving/settings.py\n"
    p.set_defaults(run=run)


def run(args) -> None:
    from refiner.errors import ConfigError

    if not args.models.is_dir():
        raise ConfigError(f"model repository {str(args.models)!r} is not a folder; run `refiner build` first or pass --models DIR")
    from pydantic import ValidationError

    from serving.app import serve
    from serving.settings import ServeSettings, settings_error

    try:
        settings = ServeSettings(
            models=args.models, workers=args.workers, device=args.serve_device,
            model_control=args.model_control, poll_s=args.poll_s,
        )  # fmt: skip
    except ValidationError as e:
        raise ConfigError(settings_error(e)) from None
    serve(settings, args.host, args.port)
