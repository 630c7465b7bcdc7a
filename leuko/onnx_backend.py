"""Exported inference runtimes on the CPU, OpenVINO and ONNX Runtime, for classifiers, the
backbone half of Grad-CAM and the U-Net segmenter. Both run the same in-memory ONNX export of
the PyTorch network, in float32.

Measured on the 2-core CPU for EfficientNet-Lite0 at 192 px: 3.5 ms per image with ONNX
Runtime against 7.6 ms for PyTorch in channels-last layout, with logits equal to 1e-6; the
U-Net at 192 px: 16 ms against 26 ms. Networks are exported in memory when a model is loaded:
the analysis pipeline (a classifier and the U-Net) loaded in 2.0-2.3 s against 0.2-0.8 s.
OpenVINO is preferred where it is installed: classifying 64 crops in batches of 8 ran at 1.10x
(``wbc_type``) and 1.18x (``all_binary``) ONNX Runtime's images per second, the median of 12
alternating runs, with logits 1e-6 apart. It is held to float32: its default on CPUs with
bfloat16 arithmetic (as this one) was 1.5x faster again but moved calibrated probabilities by
up to 0.16 and changed 3 of 1,977 ``wbc_type`` answers on the validation and test splits.

Mixing runtimes costs time, as PyTorch's OpenMP threads keep spinning after a call while the
exported runtime's start (a Grad-CAM in PyTorch followed by a U-Net in ONNX Runtime: 35 ms
against 41 ms for both in PyTorch, instead of the 31 ms the separate figures add to), so the
analysis pipeline runs every heavy part in the exported runtime and only the classification
head, whose gradients Grad-CAM needs, in PyTorch: the same pair then took 29 ms against 51 ms.

Each export is checked against its network when the model is loaded: seed 002's network
(EfficientNetV2-M, randomly initialised) exported without error, yet its backbone's features
came out far from PyTorch's and its logits 0.2 away, so a model whose export differs stays on
PyTorch (``auto``) or is refused (``openvino``, ``onnx``).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import threading
import warnings
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino", "onnx")
"""Inference backends: ``auto`` (the first installed of OpenVINO and ONNX Runtime on the CPU,
PyTorch otherwise), ``torch``, ``openvino``, ``onnx`` (ONNX Runtime)."""

RUNTIME_PACKAGES = {"openvino": "openvino", "onnx": "onnxruntime"}
"""The Python package each exported runtime backend needs (besides ``onnx`` for the export)."""

RUNTIME_NAMES = {"openvino": "OpenVINO", "onnx": "ONNX Runtime"}

EXPORT_LOCK = threading.Lock()
"""``torch.onnx.export`` keeps its state in a process-wide flag, so two exports at once (the
app's sessions, or a page rerun while the previous run still loads a model) fail with
"GLOBALS.in_onnx_export must be False" and left the model on PyTorch; exports take turns."""

Runner = Callable[[str, np.ndarray], np.ndarray]
"""Runs an exported network on a float32 (N, 3, S, S) batch and returns the named output."""


class OnnxExportError(RuntimeError):
    """A network could not be exported to OpenVINO or ONNX Runtime, or its export does not
    reproduce the network's outputs."""


class OnnxNetwork:
    """A PyTorch network taking one (N, 3, S, S) image batch, exported in memory and served by
    ``runtime`` (``openvino`` or ``onnx``: ONNX Runtime). ``output_names`` name the network's
    outputs, in order (one tensor or a tuple).

    The export is checked once, on a random batch of two, against the network, or for the
    first output against ``reference`` when given (the model a wrapper was built around);
    raises :class:`OnnxExportError` when the export or the check fails, or when an output is
    further from PyTorch's than 1e-4 plus 1e-3 of that output's largest magnitude.
    """

    def __init__(self, network: torch.nn.Module, input_size: int, runtime: str = "onnx",
                 output_names: tuple[str, ...] = ("logits",), reference: torch.nn.Module | None = None) -> None:
        if runtime not in RUNTIME_PACKAGES:
            raise ValueError(f"runtime must be openvino or onnx, not {runtime!r}")
        buffer = io.BytesIO()
        example = torch.zeros(1, 3, input_size, input_size)
        self.runtime = runtime
        self.output_names = output_names
        try:
            with EXPORT_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(network.eval(), example, buffer, input_names=["image"],
                                  output_names=list(output_names),
                                  dynamic_axes={name: {0: "batch"} for name in ("image", *output_names)},
                                  dynamo=False, opset_version=17)
            start = _openvino_runner if runtime == "openvino" else _onnxruntime_runner
            self._run = start(buffer.getvalue(), torch.get_num_threads())
        except Exception as exc:
            raise OnnxExportError(f"{type(network).__name__} could not be exported to "
                                  f"{RUNTIME_NAMES[runtime]}: {exc}") from exc
        self._check_against(network, input_size, reference)

    @property
    def runtime_name(self) -> str:
        """The runtime in words: ``OpenVINO`` or ``ONNX Runtime``."""
        return RUNTIME_NAMES[self.runtime]

    def _check_against(self, network: torch.nn.Module, input_size: int, reference: torch.nn.Module | None) -> None:
        batch = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            outputs = network(batch)
            expected = list(outputs) if isinstance(outputs, tuple) else [outputs]
            if reference is not None:
                expected[0] = reference(batch)
        if len(expected) != len(self.output_names):
            raise OnnxExportError(f"{type(network).__name__} has {len(expected)} output(s), "
                                  f"not the {len(self.output_names)} named")
        try:
            produced = [self(batch, name) for name in self.output_names]
        except Exception as exc:
            raise OnnxExportError(f"the ONNX export of {type(network).__name__} fails on a batch of two: {exc}") from exc
        for name, got, wanted in zip(self.output_names, produced, expected):
            wanted = wanted.float()
            difference = float((got - wanted).abs().max())
            if not difference <= 1e-4 + 1e-3 * float(wanted.abs().max()):
                raise OnnxExportError(f"the ONNX export of {type(network).__name__} differs from it by "
                                      f"{difference:.3g} on output {name!r}")

    def __call__(self, batch: torch.Tensor, output: str | None = None) -> torch.Tensor:
        """One output (the first by default: logits) for a preprocessed (N, 3, S, S) batch."""
        values = self._run(output or self.output_names[0], np.ascontiguousarray(batch.numpy(), dtype=np.float32))
        return torch.from_numpy(values)


def _onnxruntime_runner(model: bytes, threads: int) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return lambda name, images: session.run([name], {"image": images})[0]


def _openvino_runner(model: bytes, threads: int) -> Runner:
    """An OpenVINO CPU model in float32 with one inference request per calling thread, as a
    request holds its own buffers and serves one call at a time."""
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(core.read_model(model), "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    ports = {name: port for port in compiled.outputs for name in port.get_names()}
    requests = threading.local()

    def run(name: str, images: np.ndarray) -> np.ndarray:
        if not hasattr(requests, "request"):
            requests.request = compiled.create_infer_request()
        return np.array(requests.request.infer({"image": images})[ports[name]])

    return run


def onnx_network(network: torch.nn.Module, input_size: int, backend: str, device: torch.device,
                 unsupported: str | None = None, output_names: tuple[str, ...] = ("logits",),
                 reference: torch.nn.Module | None = None) -> OnnxNetwork | None:
    """The exported runtime serving ``network`` under ``backend``, or ``None`` for PyTorch.
    ``unsupported`` says why this network cannot be exported at all (``None``: it can).

    Raises ``ValueError`` for an unknown backend, and for ``openvino`` or ``onnx`` off the CPU,
    for an unsupported network, without the runtime's package, or when the export fails; under
    ``auto`` a failed export logs a warning and leaves the network on PyTorch.
    """
    runtime = choose_runtime(backend, device, unsupported)
    if runtime is None:
        return None
    try:
        return OnnxNetwork(network, input_size, runtime, output_names=output_names, reference=reference)
    except OnnxExportError as exc:
        if backend != "auto":
            raise ValueError(f"the {backend} backend cannot serve this model: {exc}") from exc
        log.warning("running on PyTorch: %s", exc)
        return None


def choose_runtime(backend: str, device: torch.device, unsupported: str | None = None) -> str | None:
    """The exported runtime (``openvino`` or ``onnx``) that ``backend`` asks for on ``device``,
    or ``None`` for PyTorch; raises ``ValueError`` as :func:`onnx_network` says."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "torch":
        return None
    if backend == "auto":
        if device.type != "cpu" or unsupported is not None:
            return None
        return next((runtime for runtime in RUNTIME_PACKAGES if runtime_installed(runtime)), None)
    if device.type != "cpu":
        raise ValueError(f"the {backend} backend runs on the CPU only, not on {device.type}")
    if unsupported is not None:
        raise ValueError(f"the {backend} backend cannot serve this model: {unsupported}")
    if not runtime_installed(backend):
        raise ValueError(f"the {backend} backend needs the {RUNTIME_PACKAGES[backend]} package "
                         f"(pip install {RUNTIME_PACKAGES[backend]})")
    return backend


def runtime_installed(runtime: str) -> bool:
    """Whether ``runtime``'s package and ``onnx`` (for the export) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", RUNTIME_PACKAGES[runtime]))
