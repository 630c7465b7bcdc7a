"""ONNX Runtime as an inference backend on the CPU: classifiers, the backbone half of Grad-CAM,
and the U-Net segmenter.

Measured on the 2-core CPU for EfficientNet-Lite0 at 192 px: 3.5 ms per image with ONNX
Runtime against 7.6 ms for PyTorch in channels-last layout, with logits equal to 1e-6; the
U-Net at 192 px: 16 ms against 26 ms. Networks are exported in memory when a model is loaded:
the analysis pipeline (a classifier and the U-Net) loaded in 2.0-2.3 s against 0.2-0.8 s.

Mixing the two runtimes costs time, as PyTorch's OpenMP threads keep spinning after a call
while ONNX Runtime's start (a Grad-CAM in PyTorch followed by a U-Net in ONNX Runtime: 35 ms
against 41 ms for both in PyTorch, instead of the 31 ms the separate figures add to), so the
analysis pipeline runs every heavy part in ONNX Runtime and only the classification head,
whose gradients Grad-CAM needs, in PyTorch: the same pair then took 29 ms against 51 ms.

Each export is checked against its network when the model is loaded: seed 002's network
(EfficientNetV2-M, randomly initialised) exported without error, yet its backbone's features
came out far from PyTorch's and its logits 0.2 away, so a model whose export differs stays on
PyTorch (``auto``) or is refused (``onnx``).
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import torch

log = logging.getLogger(__name__)


class OnnxExportError(RuntimeError):
    """A network could not be exported to ONNX Runtime, or its export does not reproduce the
    network's outputs."""


class OnnxNetwork:
    """An in-memory ONNX Runtime session of a PyTorch network taking one (N, 3, S, S) image
    batch. ``output_names`` name the network's outputs, in order (one tensor or a tuple).

    The export is checked once, on a random batch of two, against the network, or for the
    first output against ``reference`` when given (the model a wrapper was built around);
    raises :class:`OnnxExportError` when the export or the check fails, or when an output is
    further from PyTorch's than 1e-4 plus 1e-3 of that output's largest magnitude.
    """

    def __init__(self, network: torch.nn.Module, input_size: int, threads: int | None = None,
                 output_names: tuple[str, ...] = ("logits",), reference: torch.nn.Module | None = None) -> None:
        import onnxruntime

        buffer = io.BytesIO()
        example = torch.zeros(1, 3, input_size, input_size)
        self.output_names = output_names
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(network.eval(), example, buffer, input_names=["image"],
                                  output_names=list(output_names),
                                  dynamic_axes={name: {0: "batch"} for name in ("image", *output_names)},
                                  dynamo=False, opset_version=17)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads or torch.get_num_threads()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = onnxruntime.InferenceSession(buffer.getvalue(), options,
                                                        providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise OnnxExportError(f"{type(network).__name__} could not be exported to ONNX: {exc}") from exc
        self._check_against(network, input_size, reference)

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
        name = output or self.output_names[0]
        values = self.session.run([name], {"image": np.ascontiguousarray(batch.numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(values)


def onnx_network(network: torch.nn.Module, input_size: int, backend: str, usable: bool, needs: str,
                 output_names: tuple[str, ...] = ("logits",),
                 reference: torch.nn.Module | None = None) -> OnnxNetwork | None:
    """The ONNX Runtime session serving ``network`` under ``backend``, or ``None`` for PyTorch.

    Raises ``ValueError`` for an unknown backend, for ``onnx`` where it is not ``usable``
    (the message says it ``needs`` that), and for ``onnx`` when the export fails; under
    ``auto`` a failed export logs a warning and leaves the network on PyTorch.
    """
    if not check_backend(backend, usable, needs):
        return None
    try:
        return OnnxNetwork(network, input_size, output_names=output_names, reference=reference)
    except OnnxExportError as exc:
        if backend == "onnx":
            raise ValueError(f"the onnx backend cannot serve this model: {exc}") from exc
        log.warning("running on PyTorch: %s", exc)
        return None


def onnx_usable(device: torch.device) -> bool:
    """Whether ONNX Runtime can serve here: it is installed and the device is the CPU."""
    return device.type == "cpu" and onnx_available()


def check_backend(backend: str, usable: bool, needs: str) -> bool:
    """Whether to use ONNX Runtime for ``backend`` (``auto``, ``torch`` or ``onnx``); raises
    ``ValueError`` for an unknown backend, or for ``onnx`` where it is not ``usable``, saying
    what it ``needs``."""
    if backend not in ("auto", "torch", "onnx"):
        raise ValueError(f"backend must be auto, torch or onnx, not {backend!r}")
    if backend == "onnx" and not usable:
        raise ValueError(f"the onnx backend needs {needs}")
    return backend != "torch" and usable


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
