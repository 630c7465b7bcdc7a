"""Shared fixtures: tiny synthetic smear-like images, an isolated LEUKO_HOME, the real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leuko.paths import default_data_root

SHARED_DATA = default_data_root()


def synthetic_cell(label: int, size: int = 48, seed: int = 0) -> np.ndarray:
    """A pink background with one cell whose nucleus colour and size depend on ``label``."""
    rng = np.random.default_rng(seed)
    image = np.empty((size, size, 3), dtype=np.float64)
    image[...] = (235, 200, 210)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.uniform(-3, 3, 2)
    radius = size * (0.22 + 0.1 * (label % 2))
    nucleus = (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2
    colours = [(90, 40, 140), (150, 60, 60), (60, 90, 150), (120, 120, 40), (40, 130, 90)]
    image[nucleus] = colours[label % len(colours)]
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_class_folder(root: Path, classes: list[str], per_class: int, size: int = 48) -> Path:
    """A folder of class sub-folders of synthetic PNG cells."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(synthetic_cell(label, size, seed=label * 1000 + i)).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture
def leuko_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("LEUKO_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def binary_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 synthetic images per class of ``all_binary`` with train/val/test sub-folders."""
    root = tmp_path_factory.mktemp("binary")
    for split, count in (("train", 24), ("val", 8), ("test", 8)):
        write_class_folder(root / split, ["ALL", "normal"], count)
    return root


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "manifest.csv").is_file():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
