"""KServe's own Python model server on a refiner artifact's model.onnx: the reference for benchmarks/serve_bench.py.

Run with a Python that has `kserve` and `onnxruntime` (a benchmark-only environment):
    python benchmarks/kserve_server.py --onnx models/NAME/1/model.onnx --name NAME --port 8080 --threads 1

The model follows KServe's custom-model pattern (a `kserve.Model` whose
`predict` runs the onnxruntime session, with the session options refiner's
server uses), answered over the same v2 protocol, binary outputs included.
"""

from __future__ import annotations

import argparse
import logging

import kserve
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse


class OnnxModel(kserve.Model):
    def __init__(self, name: str, onnx: str, threads: int) -> None:
        super().__init__(name)
        self.onnx, self.threads = onnx, threads
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(self.onnx, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None, response_headers: dict[str, str] | None = None) -> InferResponse:
        y = self.session.run(None, {self.input_name: payload.inputs[0].as_numpy()})[0]
        output = InferOutput(name=self.output_name, shape=list(y.shape), datatype="FP32")
        output.set_data_from_numpy(y, binary_data=True)
        return InferResponse(model_name=self.name, infer_outputs=[output], response_id=payload.id, use_binary_outputs=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--grpc-port", type=int, help="also serve KServe's gRPC v2 server on this port (default: off)")
    args = p.parse_args()
    grpc = {"enable_grpc": True, "grpc_port": args.grpc_port} if args.grpc_port else {"enable_grpc": False}
    server = kserve.ModelServer(http_port=args.port, workers=args.workers, enable_latency_logging=False, **grpc)
    for quiet in ("uvicorn.access", "kserve.trace"):  # no per-request logging, as refiner's server under the benchmark
        logging.getLogger(quiet).setLevel(logging.WARNING)
    server.start([OnnxModel(args.name, args.onnx, args.threads)])


if __name__ == "__main__":
    main()
