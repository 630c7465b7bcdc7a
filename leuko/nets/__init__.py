"""Network architectures: the registry, the seeds' heads and their backbones."""

from leuko.nets import archs as _archs  # noqa: F401  (registers the architectures)
from leuko.nets.registry import (ARCHITECTURES, ArchSpec, LeukoNet, Recipe, build_model, get_arch,
                                 register_arch, resolve_target_layer)

__all__ = ["ARCHITECTURES", "ArchSpec", "LeukoNet", "Recipe", "build_model", "get_arch",
           "register_arch", "resolve_target_layer"]
