"""ONNX Runtime as an inference backend on the CPU: classifiers, the backbone half of Grad-CAM,
and the U-Net segmenter.

Measured on the 2-core CPU for EfficientNet-Lite0 at 192 px: 3.5 ms per image with ONNX
Runtime against 7.6 ms for PyTorch in channels-last layout, with logits equal to 1e-6; the
U-Net at 192 px: 16 ms against 26 ms. Networks are exported in memory when a model is loaded
(a fraction of a second each). Mixing the two runtimes costs time, as PyTorch's OpenMP
threads keep spinning after a call while ONNX Runtime's start (a Grad-CAM in PyTorch followed
by a U-Net in ONNX Runtime: 35 ms against 41 ms for both in PyTorch, instead of the 31 ms
the separate figures add to), so the analysis pipeline runs every heavy part in ONNX Runtime
and only the classification head, whose gradients Grad-CAM needs, in PyTorch: the same pair
then took 29 ms against 51 ms in one run.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch


class OnnxNetwork:
    """An in-memory ONNX Runtime session of a PyTorch network taking one (N, 3, S, S) image
    batch. ``output_names`` name the network's outputs, in order (one tensor or a tuple)."""

    def __init__(self, network: torch.nn.Module, input_size: int, threads: int | None = None,
                 output_names: tuple[str, ...] = ("logits",)) -> None:
        import onnxruntime

        buffer = io.BytesIO()
        example = torch.zeros(1, 3, input_size, input_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(network.eval(), example, buffer, input_names=["image"], output_names=list(output_names),
                              dynamic_axes={name: {0: "batch"} for name in ("image", *output_names)},
                              dynamo=False, opset_version=17)
        self.output_names = output_names
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: torch.Tensor, output: str | None = None) -> torch.Tensor:
        """One output (the first by default: logits) for a preprocessed (N, 3, S, S) batch."""
        name = output or self.output_names[0]
        values = self.session.run([name], {"image": np.ascontiguousarray(batch.numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(values)


def onnx_usable(device: torch.device) -> bool:
    """Whether ONNX Runtime can serve here: it is installed and the device is the CPU."""
    return device.type == "cpu" and onnx_available()


def check_backend(backend: str, usable: bool, what: str) -> bool:
    """Whether to use ONNX Runtime for ``backend`` (``auto``, ``torch`` or ``onnx``); raises
    ``ValueError`` for an unknown backend or ``onnx`` where it cannot serve ``what``."""
    if backend not in ("auto", "torch", "onnx"):
        raise ValueError(f"backend must be auto, torch or onnx, not {backend!r}")
    if backend == "onnx" and not usable:
        raise ValueError(f"the onnx backend needs onnxruntime, the CPU and {what}")
    return backend != "torch" and usable


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
