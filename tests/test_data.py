import random

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from leuko.data import (InputConfig, ImageDataset, RandomRotationReflect, RandomZoom, StainNormalize, balanced_sampler,
                        build_transform, read_folder, read_manifest, view_box)
from leuko.preprocess import PreprocessConfig
from leuko.tasks import get_task
from tests.conftest import synthetic_cell, write_class_folder


def test_manifest_selects_task_split_and_dataset(tmp_path):
    rows = [("a/1.png", "", "x", "all_binary", "ALL", "train"), ("a/2.png", "m/2.png", "x", "all_binary", "normal", "train"),
            ("a/3.png", "", "y", "all_binary", "ALL", "train"), ("a/4.png", "", "x", "all_binary", "ALL", "test"),
            ("b/1.png", "", "z", "wbc_type", "basophil", "train")]
    pd.DataFrame(rows, columns=["path", "mask", "dataset", "task", "label", "split"]).to_csv(tmp_path / "m.csv", index=False)
    task = get_task("all_binary")
    samples = read_manifest(tmp_path / "m.csv", task, "train")
    assert [s.path.name for s in samples] == ["1.png", "2.png", "3.png"]
    assert [s.label for s in samples] == [0, 1, 0]
    assert samples[1].mask == tmp_path / "m/2.png" and samples[0].mask is None
    assert len(read_manifest(tmp_path / "m.csv", task, "train", ["y"])) == 1
    with pytest.raises(ValueError, match="no rows"):
        read_manifest(tmp_path / "m.csv", task, "val")


def test_manifest_with_unknown_label_or_missing_column_is_refused(tmp_path):
    pd.DataFrame([("1.png", "all_binary", "AML", "train")], columns=["path", "task", "label", "split"]).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ValueError, match="AML"):
        read_manifest(tmp_path / "m.csv", get_task("all_binary"), "train")
    pd.DataFrame([("1.png", "ALL")], columns=["path", "label"]).to_csv(tmp_path / "n.csv", index=False)
    with pytest.raises(ValueError, match="missing column"):
        read_manifest(tmp_path / "n.csv", get_task("all_binary"), "train")


def test_folder_without_splits_is_cut_in_contiguous_blocks(tmp_path):
    write_class_folder(tmp_path, ["ALL", "normal"], 10, size=16)
    task = get_task("all_binary")
    train, val, test = (read_folder(tmp_path, task, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (16, 2, 2)
    assert [p.path.name for p in train if p.label == 0] == [f"{i:03d}.png" for i in range(8)]
    assert [p.path.name for p in test if p.label == 0] == ["009.png"]
    assert len(read_folder(tmp_path, task, "all")) == 20


def test_folder_with_wrong_class_names_is_refused(tmp_path):
    write_class_folder(tmp_path, ["ALL", "blasts"], 2, size=16)
    with pytest.raises(ValueError, match="blasts"):
        read_folder(tmp_path, get_task("all_binary"), "train")


def test_folder_split_subfolders_are_used(binary_folder):
    task = get_task("all_binary")
    assert len(read_folder(binary_folder, task, "train")) == 48
    assert len(read_folder(binary_folder, task, "val")) == 16


def test_transforms_give_normalised_tensors_of_the_input_size():
    image = Image.fromarray(synthetic_cell(0, 40))
    config = InputConfig(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                         preprocess=PreprocessConfig(wiener=True, equalization="clahe"))
    for train in (False, True):
        tensor = build_transform(config, train)(image)
        assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
        assert tensor.is_contiguous()
        assert -1.0 <= tensor.min() and tensor.max() <= 1.0
    eval_tf = build_transform(config, False)
    assert torch.equal(eval_tf(image), eval_tf(image))


def test_stain_normalisation_gives_the_same_colours_for_a_tensor_as_for_a_pil_image():
    image = Image.fromarray(synthetic_cell(2, 90))
    normalise = StainNormalize(PreprocessConfig(stain_normalization="reinhard"))
    as_tensor = normalise(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    assert torch.equal(as_tensor.permute(1, 2, 0), torch.from_numpy(np.array(normalise(image))))
    assert not np.array_equal(np.asarray(normalise(image)), np.asarray(image))


def test_prediction_resizes_within_two_grey_levels_of_pil_resizing():
    image = Image.fromarray(synthetic_cell(2, 90))
    config = InputConfig(input_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
    via_pil = np.asarray(image.resize((64, 64), Image.BICUBIC), np.float32) / 127.5 - 1.0
    predicted = build_transform(config, train=False)(image).permute(1, 2, 0).numpy()
    assert np.abs(predicted - via_pil).max() <= 2.5 / 127.5


def test_view_zoom_shows_the_network_the_centre_of_the_image_only():
    frame = synthetic_cell(1, 90)
    assert view_box(90, 90, 1.5) == (15, 15, 75, 75) and view_box(90, 60, 1.0) == (0, 0, 90, 60)
    zoomed = InputConfig(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, view_zoom=1.5)
    whole = InputConfig(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    seen = build_transform(zoomed, train=False)(Image.fromarray(frame))
    assert torch.equal(seen, build_transform(whole, train=False)(Image.fromarray(frame[15:75, 15:75].copy())))
    assert not torch.equal(seen, build_transform(whole, train=False)(Image.fromarray(frame)))
    assert build_transform(zoomed, train=True)(Image.fromarray(frame)).shape == (3, 32, 32)


def test_view_zoom_below_one_is_refused_and_older_cards_see_the_whole_image():
    with pytest.raises(ValueError, match="view_zoom"):
        InputConfig(view_zoom=0.8)
    assert InputConfig.from_dict({"input_size": 64}).view_zoom == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_rotation_turns_the_crop_and_fills_corners_with_mirrored_background_not_black(seed, monkeypatch):
    monkeypatch.setattr(random, "uniform", random.Random(seed).uniform)
    array = np.full((30, 30, 3), 220, np.uint8)
    array[14:16, 15:19] = 60
    rotated = np.asarray(RandomRotationReflect()(Image.fromarray(array)))
    assert not np.array_equal(rotated, array) and rotated.min() < 150
    assert rotated[[0, 0, -1, -1], [0, -1, 0, -1]].min() == 220


def _cell_diameter(image: np.ndarray) -> int:
    """Widest dark disc in pixels: the longest run of dark pixels in any row (mirrored copies
    at the border of a zoomed-out image are separate runs)."""
    longest = 0
    for row in image[..., 0] < 128:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
        longest = max([longest, *(edges[1::2] - edges[::2])])
    return int(longest)


def test_zoom_enlarges_or_shrinks_the_cell_by_the_drawn_factor():
    frame = np.full((90, 90, 3), 230, np.uint8)
    cv2.circle(frame, (45, 45), 15, (60, 30, 120), -1)
    image = Image.fromarray(frame)
    assert abs(_cell_diameter(np.asarray(RandomZoom((2.0, 2.0), 90)(image))) - 62) <= 4
    zoomed_out = np.asarray(RandomZoom((0.5, 0.5), 90)(image))
    assert zoomed_out.shape == (90, 90, 3) and abs(_cell_diameter(zoomed_out) - 15) <= 3
    with pytest.raises(ValueError, match="zoom_range"):
        RandomZoom((2.0, 1.0), 90)


def test_training_transform_with_zoom_and_stain_normalisation_gives_the_input_size():
    config = InputConfig(input_size=40, mean=(0.5,) * 3, std=(0.5,) * 3,
                         preprocess=PreprocessConfig(stain_normalization="reinhard"))
    image = Image.fromarray(synthetic_cell(0, 64))
    for train in (True, False):
        tensor = build_transform(config, train, stain_jitter=0.2, zoom_range=(0.7, 2.8))(image)
        assert tensor.shape == (3, 40, 40) and torch.isfinite(tensor).all()


def test_balanced_sampler_draws_classes_equally():
    labels = [0] * 90 + [1] * 10
    drawn = [labels[i] for i in balanced_sampler(labels, seed=1)]
    assert 0.35 < np.mean(drawn) < 0.65


def test_balanced_sampler_draws_source_datasets_equally_and_repeats_with_its_generator():
    datasets = ["jtsc"] * 210 + ["cellavision"] * 70 + ["all_idb2"] * 182
    samplers = [balanced_sampler(datasets, torch.Generator().manual_seed(3)) for _ in range(2)]
    draws = [[datasets[i] for _ in range(20) for i in sampler] for sampler in samplers]
    assert draws[0] == draws[1] and len(draws[0]) == 20 * len(datasets)
    assert all(0.30 < draws[0].count(name) / len(draws[0]) < 0.37 for name in set(datasets))


def test_dataset_returns_tensor_and_label(binary_folder):
    samples = read_folder(binary_folder, get_task("all_binary"), "val")
    dataset = ImageDataset(samples, build_transform(InputConfig(input_size=24), False))
    tensor, label = dataset[len(dataset) - 1]
    assert tensor.shape == (3, 24, 24) and label == 1


@pytest.mark.shared_data
def test_shared_manifest_splits_match_its_readme(shared_data):
    task = get_task("all_binary")
    sizes = {s: len(read_manifest(shared_data / "manifest.csv", task, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 182, "val": 26, "test": 26}
    wbc = {split: read_manifest(shared_data / "manifest.csv", get_task("wbc_type"), split,
                                ["wbc_seg_jtsc", "wbc_seg_cellavision"]) for split in ("train", "val", "test")}
    assert {split: len(rows) for split, rows in wbc.items()} == {"train": 280, "val": 40, "test": 40}
    with pytest.raises(ValueError, match="no rows"):
        read_manifest(shared_data / "manifest.csv", get_task("wbc_type"), "external")
    sample = read_manifest(shared_data / "manifest.csv", get_task("ball_subtype"), "val")[0]
    tensor, _ = ImageDataset([sample], build_transform(InputConfig(input_size=64), True))[0]
    assert tensor.shape == (3, 64, 64)


def test_stain_jitter_changes_colour_but_not_geometry():
    from leuko.data import RandomStainJitter
    image = Image.fromarray(synthetic_cell(0, 40))
    np.random.seed(3)
    jittered = np.asarray(RandomStainJitter(0.2)(image)).astype(int)
    original = np.asarray(image).astype(int)
    assert jittered.shape == original.shape and np.abs(jittered - original).mean() > 1
    assert np.corrcoef(jittered[..., 1].ravel(), original[..., 1].ravel())[0, 1] > 0.9


@pytest.mark.shared_data
def test_aria_cells_relabel_into_the_binary_task(shared_data):
    from leuko.data import read_relabelled
    samples = read_relabelled(shared_data / "manifest.csv", get_task("all_binary"), get_task("ball_subtype"),
                              "train", {"Benign": "normal", "Early": "ALL", "Pre": "ALL", "Pro": "ALL"})
    assert len(samples) == 2280 and sum(s.label == 1 for s in samples) == 353
    with pytest.raises(ValueError, match="not classes"):
        read_relabelled(shared_data / "manifest.csv", get_task("all_binary"), get_task("ball_subtype"), "train",
                        {"Benign": "healthy"})


def test_colour_invariance_turns_some_training_crops_grey_and_jitters_hue():
    config = InputConfig(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    image = Image.fromarray(synthetic_cell(0, 48))
    torch.manual_seed(0)

    def grey_share(colour_invariance: bool) -> float:
        transform = build_transform(config, True, colour_invariance=colour_invariance)
        tensors = [transform(image) for _ in range(60)]
        return np.mean([float((t - t.mean(0)).abs().max()) < 1e-6 for t in tensors])

    assert grey_share(False) == 0.0
    assert 0.05 < grey_share(True) < 0.45


def test_a_missing_folder_is_named_as_missing(tmp_path):
    with pytest.raises(ValueError, match="nope: no such folder"):
        read_folder(tmp_path / "nope", get_task("all_binary"), "all")
