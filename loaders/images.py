"""Pictures as CIFAR input (tools/predict.py, --dataset folder): any PNG/JPEG, any size and
mode -> uint8 32 x 32 x 3 RGB.

CIFAR-10's images are whole photos shrunk to 32 x 32 (the 80 Million Tiny Images were resized
without cropping), so a picture is resized whole, ignoring its aspect ratio: LANCZOS when
shrinking (antialiased, as PIL's bilinear is too, and sharper; a nearest shrink would alias
fine detail into patterns CIFAR never shows), BICUBIC when enlarging. A 32 x 32 picture is used as
is, so saving a CIFAR image and predicting it gives the model exactly that image.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import DataError, one_line
from common.paths import dead_link, not_a_file

SIZE = 32
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# what errors name as readable: a file given by name is read whatever its suffix, by PIL
FORMATS = "PNG, JPEG, BMP, GIF, TIFF, WebP or another format PIL reads"
BACKGROUND = (255, 255, 255)  # transparent pixels become white, as viewers show them


def expand(paths: list[Path]) -> list[Path]:
    """The files to classify: each file as given, each folder's image files sorted by name.
    A folder's entry with an image's name that is no file (a link to a file that is gone, a
    pipe) is among them, to be named as unreadable rather than left out unseen; a sub-folder
    is not (sub-folders are not read)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir()
                            if not p.is_dir() and p.suffix.lower() in SUFFIXES)
        else:
            files.append(path)
    return files


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode: alpha composited on white, 16-bit and float scaled, not cut."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # PIL's own I;16 -> L conversion clips at 255 instead of scaling the 16-bit range
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values * 255 / top + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":  # float: 0..1 by convention, else 0..255 or 0..its maximum
        values = np.asarray(image, dtype=np.float64)
        values = np.where(np.isfinite(values), values, 0.0)  # NaN and infinities are black
        top = 1.0 if values.max() <= 1.0 else max(255.0, values.max())
        image = Image.fromarray(np.clip(values * 255 / top + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")  # keeps a palette's transparency for the composite below
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        image = Image.alpha_composite(flat, rgba)
    return image.convert("RGB")


@contextmanager
def quiet_pil() -> Iterator[None]:
    """PIL's warnings silenced: its notes on damaged metadata ('Corrupt EXIF data') are lines
    of stderr that name no file, and the pixels decode, which is all that is used; its
    decompression-bomb warning too, as decode_image refuses those pictures itself. The
    warning filters are the process's, not a thread's: enter it once, around every thread.
    libtiff writes its own complaints to the C stderr, beyond any filter: a damaged TIFF can
    print such lines (naming no file) before its one-line error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"PIL\.")
        yield


def upright(image: Image.Image) -> Image.Image:
    """The picture turned as its EXIF orientation says (photos taken sideways stand upright);
    as stored when its EXIF block cannot be applied: that is only metadata, and on damaged
    tags PIL raises TypeError, struct.error and more while rewriting the block."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - the pixels are whole: used as they are stored
        return image


def read_image(path: Path) -> np.ndarray:
    """A picture as uint8 32 x 32 x 3 RGB (see the module docstring); DataError naming the file."""
    with quiet_pil():
        return decode_image(path)


def decode_image(path: Path) -> np.ndarray:
    """read_image, for threads: their caller holds quiet_pil() around them all."""
    if not path.is_file():  # a pipe or a device would never end: not opened
        if problem := not_a_file(path):
            raise DataError(f"{path} {problem}; pass a picture file")
        problem = dead_link(path)
        raise DataError(f"{path} {problem}" if problem else f"{path}: no such file")
    try:
        with Image.open(path) as opened:
            if opened.width * opened.height > Image.MAX_IMAGE_PIXELS:  # PIL only warns up to 2x
                raise Image.DecompressionBombError
            opened.load()
            image = to_rgb(upright(opened))
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image; pass a picture file ({FORMATS})"
                        ) from None
    except Image.DecompressionBombError:
        raise DataError(f"{path}: over {Image.MAX_IMAGE_PIXELS} pixels, refused as a possible "
                        "decompression bomb; shrink it first") from None
    except MemoryError:
        raise  # the machine's limit, not the file's fault: the command says so (common.cli)
    # truncated or corrupt data: PIL's plugins raise OSError, ValueError, SyntaxError,
    # TypeError, struct.error, ..., and whichever it is, the file cannot be used
    except Exception as error:  # noqa: BLE001
        raise DataError(f"{path}: cannot decode it ({one_line(error, 120)}); "
                        "the file is damaged or not an image") from None
    if image.size != (SIZE, SIZE):
        shrink = image.width >= SIZE and image.height >= SIZE
        filter_ = Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC
        image = image.resize((SIZE, SIZE), filter_)
    return np.asarray(image, dtype=np.uint8).copy()
