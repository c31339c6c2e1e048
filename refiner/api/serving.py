"""Serving a model repository from Python, as `refiner serve` does: in this process, or in a child process to stop later.

Torch-free: the server needs neither torch nor the rest of refiner.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from refiner.errors import ConfigError

__all__ = ["serve", "Server"]


@dataclass
class Server:
    """A model server running in its own process (`serve(..., block=False)`, which has an example): its URL, and how to stop it."""

    url: str
    process: subprocess.Popen
    log: IO[bytes]  # its stdout and stderr

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's log."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGTERM: requests in flight finish, then the process exits."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(
    models: str | Path = "models", host: str = "127.0.0.1", port: int = 8000, *, block: bool = True, ready_timeout_s: float = 60.0,
    **settings: Any,
) -> Server | None:  # fmt: skip
    """Serve a model repository over HTTP (KServe v2 and `/v1/models/NAME/classify`), as `refiner serve` does.

    `block=True` serves in this process until interrupted. `block=False` starts `python -m serving`
    in a child process, waits until it is ready, and returns a `Server` (a context manager) to stop it.

    Args:
        models: the model repository folder.
        host: the address to listen on ("0.0.0.0": every interface).
        port: the TCP port.
        block: serve here until interrupted (True), or in a child process (False).
        ready_timeout_s: with block=False, how long to wait for the child to be ready.
        **settings: any field of `serving.settings.ServeSettings`: workers, device, model_control,
            api_key, restricted_apis, exit_on_error, strict_readiness, max_batch_size, ...

    Examples:
        >>> import json, refiner, socket, tempfile, torch, urllib.request
        >>> a, b = refiner.create_model("tiny_vgg", 4), refiner.create_model("tiny_vgg", 4)
        >>> fitted = refiner.fit(a, b, [torch.randn(16, 3, 16, 16) for _ in range(2)], steps=20)
        >>> repo = tempfile.mkdtemp()
        >>> _ = refiner.export(refiner.refined_model(a, fitted, b), "tiny", models=repo, preprocess=refiner.Preprocess(input_size=(3, 16, 16)))
        >>> with socket.socket() as s:
        ...     _ = s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        >>> with refiner.serve(repo, port=port, block=False) as server:
        ...     json.load(urllib.request.urlopen(f"{server.url}/v2/models/tiny"))["versions"]
        ['1']
    """
    from pydantic import ValidationError

    from serving.settings import ServeSettings, settings_error

    if not Path(models).is_dir():
        raise ConfigError(f"model repository {str(models)!r} is not a folder; export a model into it first")
    try:
        config = ServeSettings(models=Path(models), **settings)
    except ValidationError as e:
        raise ConfigError(settings_error(e)) from None
    if block:
        from serving.app import serve as run

        run(config, host, port)
        return None
    cmd = [sys.executable, "-m", "serving", "--host", host, "--port", str(port)]
    log = tempfile.TemporaryFile()  # the server's log: a pipe nobody reads would fill and stall it
    process = subprocess.Popen(cmd, env={**os.environ, **config.to_env()}, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://{host}:{port}", process, log)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(f"the server exited with code {process.returncode}: {server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/v2/health/ready", timeout=1) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise ConfigError(f"the server did not become ready at {server.url} within {ready_timeout_s:g} s")
