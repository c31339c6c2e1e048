"""`refiner serve`: the model repository over HTTP (its flags are the server's own, serving/flags.py)."""

from __future__ import annotations

from refiner.cli import options

__all__ = ["register", "run"]


def register(sub) -> None:
    from serving.flags import EPILOG, add_flags

    p = options.command(
        sub,
        "serve",
        "Serve the model repository over HTTP (KServe v2 + image classification).",
        "  refiner serve --models models/\n  refiner serve --models models/ --host 0.0.0.0 --port 8080 --workers 2\n"
        "  refiner serve --models models/ --model-control poll --poll-s 5   # serve new exports without a restart\n"
        "  refiner serve --host 0.0.0.0 --model-control explicit --api-key-file /run/secrets/refiner-key\n",
    )
    add_flags(p)
    p.epilog += "\nother settings (limits, timeouts, batching) come from REFINER_SERVE_* variables; see serving/settings.py\n\n" + EPILOG
    p.set_defaults(run=run)


def run(args) -> None:
    from refiner.api.serving import serve
    from refiner.errors import ConfigError
    from serving.flags import FlagError, settings_from_flags

    try:
        settings = settings_from_flags(args)
    except FlagError as e:
        raise ConfigError(str(e)) from None
    if not settings.models.is_dir():
        raise ConfigError(f"model repository {str(settings.models)!r} is not a folder; run `refiner build` first or pass --models DIR")
    serve(host=args.host, port=args.port, **settings.model_dump())
