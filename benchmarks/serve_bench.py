"""Serving benchmark on loopback (run by hand; figures go to docs/benchmarks.md, "## Serving").

  python benchmarks/serve_bench.py --untrained resnet18 --workers 2 \
      --kserve-python KSERVE_VENV/bin/python --server-cores 0 --client-cores 1
  python benchmarks/serve_bench.py --models models --model digits-refined --setups refiner-1
      the same on a built model; --untrained ARCH exports an untrained refined
      model of that architecture the way `refiner build` does (speed does not
      depend on the weights)

Setups, each a server in a subprocess on the same ONNX file over the same v2
protocol: `refiner-1` (python -m serving, one worker), `refiner-N` (--workers
processes), `kserve` (KServe's own Python model server, benchmarks/kserve_server.py,
run by a Python that has the `kserve` package: a benchmark-only dependency), and
the gRPC half: `refiner-grpc` (python -m serving --grpc-port, one worker) and
`kserve-grpc` (KServe's gRPC server), driven by a grpc.aio client sending
ModelInferRequests with raw_input_contents (what tritonclient.grpc sends).
Each gets a bounded number of v2 infer requests (binary tensors, so the client
spends little CPU) from `concurrency` asyncio workers, at 1 and --batch images
per request: requests/s, images/s, p50/p95/p99 latency, errors, and the CPU time
of the server's whole process tree per request. The raw onnxruntime session,
with the server's session options, is the ceiling. The client can be pinned to
other cores than the servers (--client-cores / --server-cores, Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from serving.artifact import discover, read_artifact
from serving.runtime import ModelRuntime, choose_providers


@dataclass
class Result:
    label: str
    concurrency: int
    rows: int  # images per request
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    server_cpu_s: float  # CPU time of the serving process (or of the raw session) during the run
    client_cpu_s: float  # CPU time of the load generator during the run

    def cpu_ms(self, seconds: float) -> str:
        return f"{seconds / max(1, len(self.latencies_ms)) * 1000:.2f}"

    def row(self) -> str:
        ok = len(self.latencies_ms)
        p50, p95, p99 = np.percentile(self.latencies_ms, [50, 95, 99]) if ok else (float("nan"),) * 3
        rps = ok / self.seconds
        return (
            f"| {self.label} | {self.concurrency} | {self.rows} | {rps:,.0f} | {rps * self.rows:,.0f} "
            f"| {p50:.1f} | {p95:.1f} | {p99:.1f} | {self.errors} "
            f"| {self.cpu_ms(self.server_cpu_s)} | {self.cpu_ms(self.client_cpu_s)} |"
        )


HEADER = (
    "| setup | concurrency | images/request | requests/s | images/s | p50 ms | p95 ms | p99 ms | errors "
    "| server CPU ms/request | client CPU ms/request |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of this process (pid None) or of another one (Linux /proc)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _raw_session(models: Path, name: str, rows: int, seconds: float, device: str, threads: int) -> Result:
    """The same session the server builds (same options), called back to back on one thread."""
    artifact = read_artifact(models, name, discover(models).versions[name][0])
    runtime = ModelRuntime(artifact, choose_providers(device), threads)
    x = np.random.default_rng(0).standard_normal((rows, *runtime.meta.input.shape)).astype(np.float32)
    for _ in range(20):
        runtime.run(x)
    latencies, start, cpu = [], time.perf_counter(), _cpu_seconds()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        runtime.run(x)
        latencies.append((time.perf_counter() - t0) * 1000)
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return Result(f"raw onnxruntime ({runtime.provider})", 1, rows, len(latencies), 0, elapsed, latencies, cpu, 0.0)


def _untrained_artifact(arch: str, models: Path) -> str:
    """Export an untrained refined model (A's trunk -> g -> B's head at the default layer) as version 1."""
    import torch

    from refiner.refine.export import export_onnx, validate_onnx
    from refiner.refine.refined import RefinedModel
    from refiner.refine.repository import ArtifactMetadata, TensorSpec, new_version, now_iso, write_model_files
    from refiner.data.samples import Preprocess
    from refiner.engine.isomorphism import IsomorphismNet
    from refiner.models.architectures import create_model, get_arch
    from refiner.models.checkpoints import file_sha256
    from refiner.models.layers import split_model

    spec, classes = get_arch(arch), [str(i) for i in range(10)]
    torch.manual_seed(0)
    trunk, _ = split_model(create_model(arch, len(classes)), spec.default_layer)
    _, head = split_model(create_model(arch, len(classes)), spec.default_layer)
    shape = tuple(trunk(torch.zeros(1, *spec.input_size)).shape[1:])
    model = RefinedModel(trunk, IsomorphismNet(shape, shape).eval(), head).eval()
    name = f"untrained-{arch}"
    with new_version(models, name) as (version, folder):
        export_onnx(model, spec.input_size, folder / "model.onnx")
        check = validate_onnx(folder / "model.onnx", model, torch.randn(5, *spec.input_size))
        meta = ArtifactMetadata(
            name=name, version=version, created=now_iso(), class_names=classes,
            input=TensorSpec(name="input", shape=list(spec.input_size)), output=TensorSpec(name="logits", shape=[len(classes)]),
            preprocess=Preprocess(input_size=spec.input_size), max_batch_size=32, onnx_sha256=file_sha256(folder / "model.onnx"),
            refined={"untrained": arch}, export_check=check.model_dump(),
        )  # fmt: skip
        (folder / "metadata.json").write_text(meta.model_dump_json(indent=2))
    write_model_files(models, meta)
    return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (a supervisor and its workers)."""
    total = 0.0
    for stat in Path("/proc").iterdir():
        if stat.name.isdigit():
            try:
                fields = (stat / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat.name) == pid or int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class _Server:
    """A v2 server in a subprocess: refiner's (`python -m serving`) or KServe's; pinned to `cores` when given."""

    def __init__(self, setup: str, models: Path, name: str, args: argparse.Namespace) -> None:
        self.port = _free_port()
        env = {**os.environ, "REFINER_SERVE_MODELS": str(models), "REFINER_SERVE_MAX_QUEUE_DELAY_MS": str(args.delay_ms),
               "REFINER_SERVE_QUEUE_SIZE": "1024", "REFINER_SERVE_DEVICE": args.device, "REFINER_SERVE_INTRA_OP_THREADS": str(args.threads)}  # fmt: skip
        self.grpc_port = _free_port() if setup.endswith("-grpc") else None
        grpc = ["--grpc-port", str(self.grpc_port)] if self.grpc_port else []
        if setup.startswith("kserve"):
            onnx = models / name / str(discover(models).versions[name][0]) / "model.onnx"
            cmd = [args.kserve_python, str(Path(__file__).with_name("kserve_server.py")), "--onnx", str(onnx), "--name", name,
                   "--port", str(self.port), "--threads", str(args.threads or 1), *grpc]  # fmt: skip
        else:
            workers = str(args.workers) if setup == "refiner-N" else "1"
            cmd = [sys.executable, "-m", "serving", "--port", str(self.port), "--workers", workers, *grpc]
        if args.server_cores:
            cmd = ["taskset", "-c", args.server_cores, *cmd]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> _Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/v2/health/ready").status_code == 200:
                    time.sleep(1.0)  # let every worker finish loading
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError("the server did not become ready within 120 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _binary_request(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def _grpc_request(name: str, x: np.ndarray):
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.outputs.add(name="logits")
    request.raw_input_contents.append(x.tobytes())
    return request


async def _drive(call, concurrency: int, total: int) -> tuple[list[float], int, float]:
    """`total` calls of `call` (an async () -> bool: answered well) from `concurrency` workers, after 20 to warm the
    connections and the server; (latencies of successes in ms, errors, seconds)."""
    latencies: list[float] = []
    errors = 0
    remaining = total
    for _ in range(min(20, total)):
        await call()

    async def worker() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            if await call():
                latencies.append((time.perf_counter() - t0) * 1000)
            else:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - start


async def _load_grpc(target: str, request, concurrency: int, total: int) -> tuple[list[float], int, float]:
    """ModelInfer calls on one channel (HTTP/2 multiplexes them), as _load."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 1 << 30)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def call() -> bool:
            try:
                await stub.ModelInfer(request, timeout=30)
            except grpc.aio.AioRpcError:
                return False
            return True

        return await _drive(call, concurrency, total)


async def _load(url: str, body: bytes, headers: dict[str, str], concurrency: int, total: int) -> tuple[list[float], int, float]:
    """`total` POSTs from `concurrency` workers (one connection each); (latencies of successes in ms, errors, seconds)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def call() -> bool:
            try:
                return (await client.post(url, content=body, headers=headers)).status_code == 200
            except httpx.HTTPError:
                return False

        return await _drive(call, concurrency, total)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=Path("models"))
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model name in the repository --models")
    which.add_argument("--untrained", metavar="ARCH", help="benchmark an untrained refined model of this architecture")
    p.add_argument("--setups", default="refiner-1,refiner-N,kserve", help="comma-separated: refiner-1, refiner-N, kserve, refiner-grpc, kserve-grpc")
    p.add_argument("--workers", type=int, default=2, help="processes of the refiner-N setup (default: 2)")
    p.add_argument("--kserve-python", help="a Python with the kserve package (needed by the kserve setup)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=200, help="requests per measurement (bounded)")
    p.add_argument("--batch", type=int, default=8, help="images per request besides 1")
    p.add_argument("--delay-ms", type=float, default=2.0, help="REFINER_SERVE_MAX_QUEUE_DELAY_MS")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads per process (0: the server's default)")
    p.add_argument("--server-cores", help="taskset core list for the servers, e.g. 0")
    p.add_argument("--client-cores", help="core list for this load generator, e.g. 1")
    args = p.parse_args()
    setups = args.setups.split(",")
    if any(s.startswith("kserve") for s in setups) and not args.kserve_python:
        p.error("the kserve setup needs --kserve-python (a Python with the kserve package)")
    if args.client_cores:
        os.sched_setaffinity(0, {int(c) for c in args.client_cores.split(",")})

    # The repository may hold several models: the server gets a repository holding only the one measured.
    models = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    if args.untrained:
        args.model = _untrained_artifact(args.untrained, models)
    else:
        (models / args.model).symlink_to((args.models / args.model).resolve())
    shape = read_artifact(models, args.model, discover(models).versions[args.model][0]).meta.input.shape
    rng = np.random.default_rng(0)
    results = [_raw_session(models, args.model, rows, 3.0, args.device, args.threads) for rows in (1, args.batch)]
    for setup in setups:
        label = setup.replace("-N", f"-{args.workers}")
        with _Server(setup, models, args.model, args) as server:
            url = f"{server.url}/v2/models/{args.model}/infer"
            for rows in (1, args.batch):
                x = rng.standard_normal((rows, *shape)).astype(np.float32)
                body, headers = _binary_request(x)
                for c in args.concurrency:
                    server_cpu, client_cpu = _tree_cpu_seconds(server.proc.pid), _cpu_seconds()
                    if server.grpc_port:
                        target = f"127.0.0.1:{server.grpc_port}"
                        latencies, errors, seconds = asyncio.run(_load_grpc(target, _grpc_request(args.model, x), c, args.requests))
                    else:
                        latencies, errors, seconds = asyncio.run(_load(url, body, headers, c, args.requests))
                    server_cpu, client_cpu = _tree_cpu_seconds(server.proc.pid) - server_cpu, _cpu_seconds() - client_cpu
                    results.append(Result(label, c, rows, args.requests, errors, seconds, latencies, server_cpu, client_cpu))
                    print(results[-1].row(), flush=True)
    print()
    print(HEADER)
    for r in results:
        print(r.row())
    print()
    _ratios(results)


def _ratios(results: list[Result]) -> None:
    """images/s of each setup against the raw session at the same batch, and refiner's against KServe's."""
    ips = {(r.label, r.concurrency, r.rows): len(r.latencies_ms) / r.seconds * r.rows for r in results}
    raw = {rows: v for (label, _, rows), v in ips.items() if label.startswith("raw")}
    print("| setup | concurrency | images/request | / raw onnxruntime | / kserve |")
    print("|---|---:|---:|---:|---:|")
    for (label, c, rows), v in ips.items():
        if label.startswith("raw"):
            continue
        k = ips.get(("kserve-grpc" if label.endswith("-grpc") else "kserve", c, rows))
        print(f"| {label} | {c} | {rows} | {v / raw[rows]:.2f} | {v / k:.2f} |" if k else f"| {label} | {c} | {rows} | {v / raw[rows]:.2f} | - |")


if __name__ == "__main__":
    main()
