"""Reading user images safely: known formats only, a pixel cap, EXIF orientation, RGB out.

Every path into the models goes through :func:`load_image`, so a corrupt, huge or
mislabelled file is refused here with a message a user can act on.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MAX_PIXELS = 50_000_000
"""Largest accepted image, in pixels (a 6000x4000 camera frame is 24 Mpx)."""

ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]


class ImageError(ValueError):
    """An image that cannot be analysed; the message says why in plain words."""


def _open(source: str | Path | bytes, max_pixels: int) -> Image.Image:
    name = "upload" if isinstance(source, bytes) else str(source)
    data = io.BytesIO(source) if isinstance(source, bytes) else source
    if not isinstance(source, bytes):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: the file is empty")
    elif len(source) == 0:
        raise ImageError(f"{name}: the file is empty")
    too_large = f"{name}: {{}} pixels is over the limit of {max_pixels / 1e6:.0f} megapixels"
    try:
        image = Image.open(data)
        animated = image.format == "WEBP" and getattr(image, "is_animated", False)
        if image.format not in {"PNG", "JPEG", "TIFF", "BMP", "MPO", "WEBP"} or animated:
            kind = f"animated {image.format}" if animated else image.format or "unknown"
            raise ImageError(f"{name}: {kind} images are not supported; use PNG, JPEG, TIFF, BMP or WebP")
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(too_large.format(f"{width}x{height}"))
        image.load()
    except Image.DecompressionBombError:
        raise ImageError(too_large.format(f"more than {Image.MAX_IMAGE_PIXELS / 1e6:.0f} million")) from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file, or a format that is not supported "
                         "(use PNG, JPEG, TIFF, BMP or WebP)") from None
    except (OSError, SyntaxError) as exc:
        raise ImageError(f"{name}: the image is damaged or truncated ({exc})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (16- or 32-bit integer or float, greyscale, palette, RGBA, CMYK)
    to 8-bit RGB.

    Integer and float greyscale is scaled so that its brightest pixel becomes 255 (a float
    image in 0-1 would otherwise be truncated to black). Transparent areas are composited on
    white, the colour of an empty smear background.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
        top = array.max() or 1.0
        image = Image.fromarray((array / top * 255.0).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(source: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Load a path, bytes, PIL image or HxWx3 uint8 array as an upright 8-bit RGB PIL image.

    Raises :class:`ImageError` with a plain-language reason for anything unusable.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        if source.ndim == 2:
            source = np.stack([source] * 3, axis=-1)
        if source.ndim != 3 or source.shape[2] not in (3, 4):
            raise ImageError(f"array of shape {source.shape} is not an RGB image")
        if source.dtype != np.uint8:
            raise ImageError(f"array of dtype {source.dtype} given; expected uint8 RGB")
        return to_rgb(Image.fromarray(source))
    image = _open(source, max_pixels)
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError):
        pass
    return to_rgb(image)


def load_mask(path: str | Path) -> np.ndarray:
    """A single-channel mask PNG (0 background, 128 cytoplasm, 255 nucleus) as an HxW uint8
    array; colour files are read as their luminance."""
    with Image.open(path) as mask:
        return np.asarray(mask.convert("L"))


OUTPUT_MARKER = ".leuko-output"
"""File that marks a folder as written by a Leuko command (overlays, masks), so that a later
run over the folder above it does not read those pictures back in as smear images."""


def mark_output_folder(folder: Path) -> Path:
    """Create ``folder`` if needed and mark it as a Leuko output folder (:data:`OUTPUT_MARKER`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OUTPUT_MARKER).write_text("Written by Leuko; image searches of the folders above skip this one.\n")
    return folder


def find_images(paths: list[str | Path]) -> list[Path]:
    """Expand files and folders (searched recursively) into a sorted list of image paths.

    Files given explicitly are kept whatever their suffix, so an unreadable one is reported
    rather than silently dropped; folders contribute files with image suffixes only, and
    none from a Leuko output folder (:func:`mark_output_folder`) below the one given. A file
    reached twice (given twice, or also through its folder) is listed once.
    """
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            entries = list(item.rglob("*"))
            outputs = {p.parent for p in entries if p.name == OUTPUT_MARKER} - {item}
            found.extend(sorted(p for p in entries
                                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                                and not outputs.intersection(p.parents)))
        else:
            found.append(item)
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())
