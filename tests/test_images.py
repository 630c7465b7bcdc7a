import io

import numpy as np
import pytest
from PIL import Image

from leuko.images import ImageError, find_images, load_image, mark_output_folder


def _png(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_modes_are_converted_to_rgb():
    for mode in ("L", "RGBA", "P", "CMYK", "I;16"):
        image = Image.new(mode, (10, 8))
        fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
        loaded = load_image(_png(image, fmt))
        assert loaded.mode == "RGB" and loaded.size == (10, 8)


def test_transparent_areas_become_white():
    loaded = load_image(_png(Image.new("RGBA", (4, 4), (0, 0, 0, 0))))
    assert np.asarray(loaded)[0, 0].tolist() == [255, 255, 255]


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (20, 10))
    exif = image.getexif()
    exif[0x0112] = 6
    assert load_image(_png(image, "JPEG", exif=exif)).size == (10, 20)


@pytest.mark.parametrize("payload, reason", [
    (b"", "empty"),
    (b"this is text, not a picture", "not an image"),
])
def test_unusable_bytes_are_refused_with_a_reason(payload, reason):
    with pytest.raises(ImageError, match=reason):
        load_image(payload)


def test_truncated_file_is_refused(tmp_path):
    data = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="damaged or truncated"):
        load_image(path)


def test_pixel_cap_refuses_huge_images_before_decoding_naming_their_size():
    with pytest.raises(ImageError, match="^upload: 3000x3000 pixels is over the limit of 1 megapixels$"):
        load_image(_png(Image.new("L", (3000, 3000))), max_pixels=1_000_000)


def test_unsupported_format_is_named():
    with pytest.raises(ImageError, match="GIF"):
        load_image(_png(Image.new("RGB", (4, 4)), "GIF"))


def test_arrays_and_missing_files():
    assert load_image(np.zeros((5, 6, 3), np.uint8)).size == (6, 5)
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((5, 6, 3), np.float32))
    with pytest.raises(ImageError, match="no such file"):
        load_image("/nonexistent/cell.png")


def test_find_images_walks_folders_and_keeps_explicit_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.png", "a/b/y.JPG", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"0")
    found = find_images([tmp_path / "a", tmp_path / "a" / "notes.txt"])
    assert [p.name for p in found] == ["y.JPG", "x.png", "notes.txt"]


def test_find_images_skips_leuko_output_folders_below_the_one_given(tmp_path):
    slide = tmp_path / "slide"
    (slide / "more").mkdir(parents=True)
    for name in ("cell.png", "more/cell2.png"):
        (slide / name).write_bytes(b"0")
    cams = mark_output_folder(slide / "cams")
    (cams / "cell_cam.png").write_bytes(b"0")
    (mark_output_folder(slide / "more" / "segmentation") / "cell2_mask.png").write_bytes(b"0")
    assert [p.name for p in find_images([slide])] == ["cell.png", "cell2.png"]
    assert [p.name for p in find_images([cams])] == ["cell_cam.png"]
    assert [p.name for p in find_images([cams / "cell_cam.png"])] == ["cell_cam.png"]


def test_a_file_reached_twice_is_listed_once(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"0")
    found = find_images([tmp_path / "a" / "x.png", tmp_path / "a", tmp_path / "a" / ".." / "a" / "x.png"])
    assert found == [tmp_path / "a" / "x.png"]
