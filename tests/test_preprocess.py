import numpy as np
import pytest

from leuko.preprocess import (PreprocessConfig, apply_preprocessing, dynamic_histogram_equalization,
                              wiener_filter)
from tests.conftest import synthetic_cell


def test_wiener_filter_reduces_noise_on_flat_background():
    rng = np.random.default_rng(0)
    noisy = np.clip(128 + rng.normal(0, 15, (64, 64, 3)), 0, 255).astype(np.uint8)
    filtered = wiener_filter(noisy, 5)
    assert filtered.dtype == np.uint8 and filtered.shape == noisy.shape
    assert filtered.astype(float).std() < 0.5 * noisy.astype(float).std()


def test_dhe_stretches_a_low_contrast_image_and_keeps_order():
    rng = np.random.default_rng(1)
    gray = np.concatenate([rng.integers(100, 115, 2000), rng.integers(130, 140, 2000)]).astype(np.uint8)
    out = dynamic_histogram_equalization(gray.reshape(40, 100))
    assert np.ptp(out) > 3 * np.ptp(gray)
    order = np.argsort(gray, kind="stable")
    assert np.all(np.diff(out.ravel()[order].astype(int)) >= 0)


def test_dhe_leaves_a_constant_image_alone():
    flat = np.full((8, 8), 77, np.uint8)
    assert np.array_equal(dynamic_histogram_equalization(flat), flat)


@pytest.mark.parametrize("equalization", ["dhe", "clahe", "global"])
def test_equalization_variants_keep_shape_and_change_contrast(equalization):
    image = synthetic_cell(0, 64)
    out = apply_preprocessing(image, PreprocessConfig(wiener=True, equalization=equalization))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image)


def test_identity_configuration_returns_the_input_and_unknown_mode_fails():
    image = synthetic_cell(1, 32)
    assert apply_preprocessing(image, PreprocessConfig()) is image
    with pytest.raises(ValueError, match="unknown equalization"):
        apply_preprocessing(image, PreprocessConfig(equalization="magic"))
