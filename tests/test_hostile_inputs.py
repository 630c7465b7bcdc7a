"""Broken, hostile and unusual image files: each is analysed correctly or refused clearly."""

import io
import re
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from leuko.images import ImageError, load_image
from leuko.paths import REPO_ROOT
from leuko.segment import classical_segment, segment_image


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _bomb_png(side: int = 30000) -> bytes:
    """A valid greyscale PNG of side x side pixels that compresses to a few tens of KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big"))
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    compressor = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * side
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _cell(size=64) -> Image.Image:
    rgb = np.full((size, size, 3), (235, 210, 220), np.uint8)
    rgb[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (110, 50, 150)
    return Image.fromarray(rgb)


REFUSED = {
    "truncated JPEG": (lambda: _save(_cell(), "JPEG")[:300], "damaged or truncated"),
    "zero-byte file": (lambda: b"", "empty"),
    "text named .png": (lambda: b"patient notes, not an image", "not an image"),
    "SVG": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "not an image"),
    "animated GIF": (lambda: _save(_cell(), "GIF", save_all=True, append_images=[_cell()]), "GIF"),
    "decompression bomb": (_bomb_png, "megapixels|too large"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unusable_files_are_refused_with_a_clear_reason(name):
    make, reason = REFUSED[name]
    with pytest.raises(ImageError, match=reason):
        load_image(make())


ACCEPTED = {
    "PNG with a .jpg name": lambda: _save(_cell(), "PNG"),
    "16-bit TIFF": lambda: _save(Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 15).astype(np.uint16)), "TIFF"),
    "32-bit float TIFF scaled 0-1": lambda: _save(
        Image.fromarray((np.arange(64 * 64).reshape(64, 64) / 4095).astype(np.float32)), "TIFF"),
    "float TIFF with an infinite pixel": lambda: _save(
        Image.fromarray(np.where(np.eye(64) > 0, np.inf, np.arange(64 * 64).reshape(64, 64) / 4095)
                        .astype(np.float32)), "TIFF"),
    "greyscale": lambda: _save(_cell().convert("L"), "PNG"),
    "RGBA": lambda: _save(_cell().convert("RGBA"), "PNG"),
    "CMYK JPEG": lambda: _save(_cell().convert("CMYK"), "JPEG"),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_unusual_but_valid_images_become_rgb(name, tmp_path):
    path = tmp_path / "upload.jpg"
    path.write_bytes(ACCEPTED[name]())
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert np.asarray(image).std() > 0 or name == "greyscale"


def test_exif_rotated_photo_is_turned_upright():
    image = _cell(64).crop((0, 0, 64, 32))
    exif = image.getexif()
    exif[0x0112] = 8
    assert load_image(_save(image, "JPEG", exif=exif)).size == (32, 64)


def test_a_6000x4000_field_photo_is_analysed_as_a_field():
    from tests.test_cellfind import add_granulocyte, smear

    small = smear(keep_clear=[((320, 240), 60)])
    add_granulocyte(small, (320, 240))
    rgb = cv2.resize(small, (6000, 4500), interpolation=cv2.INTER_LINEAR)[250:4250]
    image = load_image(_save(Image.fromarray(rgb), "JPEG", quality=90))
    result = segment_image(np.asarray(image), classical_segment)
    assert result.kind == "field" and len(result.cells) == 1


def test_no_unsafe_torch_load_anywhere_in_the_code():
    calls = []
    for path in list((REPO_ROOT / "leuko").rglob("*.py")) + list((REPO_ROOT / "pages").rglob("*.py")) + [REPO_ROOT / "app.py"]:
        for match in re.finditer(r"torch\.load\((.*?)\)", path.read_text(), re.S):
            calls.append((path.name, match.group(1)))
    assert calls, "the search must see the offline-weights loader"
    assert all("weights_only=True" in arguments for _, arguments in calls), calls
    assert not any(re.search(r"^\s*(import pickle|from pickle)|pickle\.loads?\(", p.read_text(), re.M)
                   for p in (REPO_ROOT / "leuko").rglob("*.py"))
