"""One onnxruntime session per model version, on the execution provider that is really available.

CUDA is requested only when onnxruntime offers the CUDA provider *and* the driver
reports a device; the provider the session actually uses is read back and logged,
so a fallback to CPU is never silent.
"""

from __future__ import annotations

import ctypes
import logging
import os

import numpy as np

from serving.artifact import Artifact
from serving.errors import ArtifactError, DeviceError
from serving.schema import ArtifactMeta

__all__ = ["CPU", "CUDA", "cuda_device_count", "choose_providers", "release_memory", "ModelRuntime"]

log = logging.getLogger("serving.runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def cuda_device_count() -> int:
    """Number of CUDA devices the driver sees (0 without a driver), asked through libcuda directly."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def choose_providers(device: str) -> list[str]:
    """Providers for `device` ("auto", "cpu", "cuda"); "cuda" without a usable GPU is an error."""
    import onnxruntime as ort

    if device == "cpu":
        return [CPU]
    has_cuda = CUDA in ort.get_available_providers() and cuda_device_count() > 0
    if has_cuda:
        return [CUDA, CPU]
    if device == "cuda":
        raise DeviceError(
            "device 'cuda' was requested but no CUDA device is usable (onnxruntime providers: "
            f"{ort.get_available_providers()}, CUDA devices: {cuda_device_count()}); use device 'auto' or 'cpu'"
        )
    return [CPU]


def release_memory() -> None:
    """Hand freed heap back to the system (glibc's malloc_trim): a model's weights are freed in many pieces,
    which would otherwise stay in the process's heap and add up across versions. A no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ModelRuntime:
    """An onnxruntime session for one verified artifact; `run` is thread-safe and blocking."""

    def __init__(self, artifact: Artifact, providers: list[str], intra_op_threads: int = 0) -> None:
        import onnxruntime as ort

        self.meta: ArtifactMeta = artifact.meta
        self._where = f"{self.meta.name}/{self.meta.version}"  # how messages name it: relative to the repository
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One batch runs at a time per model (see batching.py): parallelism comes from intra-op threads.
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = intra_op_threads or available_cores()
        options.inter_op_num_threads = 1
        # Idle worker threads must not spin: they share the cores with the event loop and image decoding.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # onnxruntime's own warnings would duplicate ours
        try:
            self.session = ort.InferenceSession(artifact.onnx, sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise ArtifactError(f"{self._where}/model.onnx: onnxruntime cannot load it: {str(e)[:500]}") from e
        # onnxruntime keeps the model's bytes to rebuild the session on a provider fallback (its own TODO says
        # "holding the memory indefinitely"): with fallback off, drop them, or each version holds its model twice.
        self.session.disable_fallback()
        self.session._model_bytes = None
        self.provider = self.session.get_providers()[0]
        if self.provider != providers[0]:
            log.warning(
                "model %s version %d: requested %s but onnxruntime runs it on %s",
                self.meta.name, self.meta.version, providers[0], self.provider,
            )
        self._check_signature()
        self.input_name = self.meta.input.name
        self.output_name = self.meta.output.name

    def _check_signature(self) -> None:
        inputs = [(i.name, list(i.shape[1:]), i.type) for i in self.session.get_inputs()]
        outputs = {o.name: o.type for o in self.session.get_outputs()}
        expected = [(self.meta.input.name, self.meta.input.shape, "tensor(float)")]
        if inputs != expected or outputs.get(self.meta.output.name) != "tensor(float)":
            raise ArtifactError(
                f"{self._where}/model.onnx takes {inputs} (name, shape without batch, type) and returns {outputs}; "
                f"metadata.json says {expected} -> {self.meta.output.name!r} (tensor(float))"
            )

    def close(self) -> None:
        """Free the session (its weights): called once no request can reach this version any more."""
        self.session = None  # type: ignore[assignment]
        release_memory()

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a float32 batch (N, *input shape)."""
        if self.provider == CUDA:
            return self._run_bound(x)
        (y,) = self.session.run([self.output_name], {self.input_name: x})
        return y

    def _run_bound(self, x: np.ndarray) -> np.ndarray:
        """On the GPU, through IO binding: the batch is copied to the device once, straight from the request's
        buffer (session.run would stage it in an extra host copy), and only the logits come back."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(x))
        binding.bind_output(self.output_name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]
