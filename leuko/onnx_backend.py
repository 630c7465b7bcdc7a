"""ONNX Runtime as an inference backend for image-only classifiers on the CPU.

Measured on the 2-core CPU for EfficientNet-Lite0 at 192 px: 3.5 ms per image with ONNX
Runtime against 7.6 ms for PyTorch in channels-last layout, with logits equal to 1e-6. The
network is exported in memory when the model is loaded (about 0.3 s); Grad-CAM still runs on
the PyTorch network, which it needs gradients from. The U-Net segmenter stays on PyTorch:
alternating ONNX Runtime and PyTorch calls on two cores made each slower (measured 24 ms per
crop against 17 ms), as their thread pools compete.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch


class OnnxNetwork:
    """An in-memory ONNX Runtime session of a PyTorch network taking one image batch."""

    def __init__(self, network: torch.nn.Module, input_size: int, threads: int | None = None) -> None:
        import onnxruntime

        buffer = io.BytesIO()
        example = torch.zeros(1, 3, input_size, input_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(network.eval(), example, buffer, input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}}, dynamo=False, opset_version=17)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """The network's output (logits) for a preprocessed (N, 3, S, S) batch."""
        logits = self.session.run(None, {"image": np.ascontiguousarray(batch.numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(logits)


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
