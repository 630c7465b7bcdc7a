"""Choosing where the networks run: CUDA when present, the CPU otherwise, overridable."""

from __future__ import annotations

import torch


class DeviceError(RuntimeError):
    """The requested device does not exist on this machine."""


def pick_device(requested: str | None = None) -> torch.device:
    """``None``/``"auto"``: the first GPU if CUDA is available, else the CPU. ``"cpu"`` or
    ``"cuda[:N]"`` explicitly; asking for CUDA where there is none raises :class:`DeviceError`."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {requested!r}; use auto, cpu or cuda") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was requested but no CUDA GPU is available here; "
                              "use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"GPU {device.index} requested but only "
                              f"{torch.cuda.device_count()} present")
    elif device.type != "cpu":
        raise DeviceError(f"device {requested!r} is not supported; use auto, cpu or cuda")
    return device


def describe_device(device: torch.device) -> str:
    """Human-readable name: the GPU model, or "CPU (N threads)"."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return f"CPU ({torch.get_num_threads()} threads)"
