import numpy as np
import pytest
from PIL import Image

from leuko.cellmasks import RandomBackground, cell_mask_files
from leuko.config import TrainConfig
from leuko.data import ImageDataset, Sample
from leuko.progress import ProgressEvent
from leuko.segment import LearnedSegmenter
from leuko.train import train_model
from tests.conftest import synthetic_cell


def _cell_on_red_cells(size: int = 96) -> tuple[Image.Image, np.ndarray]:
    """A purple cell of radius 20 px at the centre, surrounded by red-cell discs; its mask."""
    rgb = np.full((size, size, 3), (236, 214, 220), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for cy, cx in ((12, 12), (12, 80), (84, 20), (80, 84)):
        rgb[(yy - cy) ** 2 + (xx - cx) ** 2 < 10 ** 2] = (220, 140, 150)
    cell = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < 20 ** 2
    rgb[cell] = (110, 50, 150)
    return Image.fromarray(rgb), cell.astype(np.uint8) * 255


def test_replacement_keeps_the_cell_and_removes_the_red_cells():
    image, mask = _cell_on_red_cells()
    rgb = np.asarray(image).astype(int)
    for seed in range(6):
        np.random.seed(seed)
        out = np.asarray(RandomBackground(1.0)(image, mask)).astype(int)
        inner = np.zeros(mask.shape, bool)
        inner[38:58, 38:58] = True
        assert np.abs(out[inner] - rgb[inner]).max() <= 1
        red_cell = (slice(6, 18), slice(6, 18))
        assert np.abs(out[red_cell] - rgb[red_cell]).mean() > 20
        yy, xx = np.mgrid[:96, :96]
        outside = (yy - 48) ** 2 + (xx - 48) ** 2 > 28 ** 2
        assert out[outside].std(axis=0).max() < 0.5 * rgb[outside].std(axis=0).max()


def test_replacement_probability_zero_and_masks_of_another_size():
    image, mask = _cell_on_red_cells()
    assert RandomBackground(0.0)(image, mask) is image
    small = np.asarray(Image.fromarray(mask).resize((48, 48), Image.NEAREST))
    out = np.asarray(RandomBackground(1.0)(image, small))
    assert out.shape == (96, 96, 3) and not np.array_equal(out, np.asarray(image))


def test_a_cell_filling_the_crop_or_an_empty_mask_leaves_it_unchanged():
    image, _ = _cell_on_red_cells()
    full = np.full((96, 96), 255, np.uint8)
    assert RandomBackground(1.0)(image, full) is image
    assert RandomBackground(1.0)(image, np.zeros_like(full)) is image
    with pytest.raises(ValueError):
        RandomBackground(1.5)


def test_annotated_masks_are_used_and_others_are_segmented_once_and_cached(tmp_path, leuko_home):
    crop = tmp_path / "cell.png"
    Image.fromarray(synthetic_cell(0, size=96)).save(crop)
    annotated = tmp_path / "mask.png"
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(annotated)
    samples = [Sample(crop, 0), Sample(crop, 0, mask=annotated), Sample(crop, 1)]
    progress: list[tuple[int, int]] = []
    segmenter = LearnedSegmenter()
    files = cell_mask_files(samples, lambda done, total: progress.append((done, total)), segmenter)
    assert files[1] == annotated and files[0] == files[2]
    assert files[0].is_relative_to(leuko_home / "cache") and progress == [(1, 1)]
    cached = np.asarray(Image.open(files[0]))
    assert cached.shape == (96, 96) and cached[48, 48] > 0 and cached[2, 2] == 0
    tiny = tmp_path / "tiny.png"
    Image.fromarray(synthetic_cell(0, size=16)).save(tiny)
    empty = cell_mask_files([Sample(tiny, 0)], segmenter=segmenter)[0]
    assert not np.asarray(Image.open(empty)).any()
    again: list[tuple[int, int]] = []
    assert cell_mask_files(samples, lambda done, total: again.append((done, total)), segmenter) == files
    assert again == []


def test_dataset_refuses_background_replacement_without_a_mask_per_sample(tmp_path):
    samples = [Sample(tmp_path / "a.png", 0)]
    with pytest.raises(ValueError, match="one cell mask"):
        ImageDataset(samples, background=RandomBackground(0.5))
    with pytest.raises(ValueError, match="background_replacement"):
        TrainConfig(task="all_binary", background_replacement=2.0)


def test_training_with_background_replacement_segments_the_crops_first(binary_folder, tmp_path, leuko_home):
    events: list[ProgressEvent] = []
    config = TrainConfig(task="all_binary", arch="seed004_squeezenet", folder=str(binary_folder), pretrained=None,
                         input_size=48, epochs=1, batch_size=8, num_workers=0, augment=True,
                         background_replacement=1.0, out_dir=str(tmp_path / "runs"), model_id="bg",
                         half_weights=False)
    result = train_model(config, callbacks=[events.append])
    assert len(result.history) == 1 and np.isfinite(result.history[0]["train_loss"])
    assert any("cell masks" in e.message and "48/48" in e.message for e in events)
    assert len(list((leuko_home / "cache" / "cell_masks").rglob("*.png"))) == 48
