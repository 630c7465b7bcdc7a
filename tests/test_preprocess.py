import cv2
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
    denoised = apply_preprocessing(image, PreprocessConfig(wiener=True))
    out = apply_preprocessing(image, PreprocessConfig(wiener=True, equalization=equalization))
    assert out.shape == image.shape and out.dtype == np.uint8

    def lightness_spread(rgb: np.ndarray) -> float:
        return float(cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[..., 0].std())

    assert lightness_spread(out) > 1.05 * lightness_spread(denoised)


def test_identity_configuration_returns_the_input_and_unknown_mode_fails():
    image = synthetic_cell(1, 32)
    assert apply_preprocessing(image, PreprocessConfig()) is image
    with pytest.raises(ValueError, match="equalization must be one of none, dhe, clahe, global"):
        PreprocessConfig(equalization="magic")


def test_reinhard_maps_two_stainings_of_one_cell_onto_the_same_colours():
    cell = synthetic_cell(2, 48).astype(np.float32)
    yellowish = np.clip(cell * [1.0, 0.95, 0.7] + [10, 5, 0], 0, 255).astype(np.uint8)
    pinkish = np.clip(cell * [0.95, 0.8, 0.9], 0, 255).astype(np.uint8)
    config = PreprocessConfig(stain_normalization="reinhard")
    before = np.abs(yellowish.astype(int) - pinkish.astype(int)).mean()
    after = np.abs(apply_preprocessing(yellowish, config).astype(int)
                   - apply_preprocessing(pinkish, config).astype(int)).mean()
    assert after < before / 3
    lab = cv2.cvtColor(apply_preprocessing(yellowish, config), cv2.COLOR_RGB2LAB).reshape(-1, 3)
    assert np.allclose(lab.mean(axis=0), config.stain_target_mean, atol=3)


def test_reinhard_keeps_a_blank_image_finite_and_refuses_an_unknown_method():
    blank = np.full((16, 16, 3), 240, np.uint8)
    out = apply_preprocessing(blank, PreprocessConfig(stain_normalization="reinhard"))
    assert out.shape == blank.shape and out.dtype == np.uint8 and (out == out[0, 0]).all()
    with pytest.raises(ValueError, match="stain_normalization must be one of none, reinhard, macenko"):
        PreprocessConfig(stain_normalization="vahadane")
