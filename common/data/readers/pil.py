"""PNG, JPEG, BMP and TIFF images and masks, through Pillow (2D, row/column
order kept)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from common.data.readers.base import PIL_FORMATS
from common.data.readers.guards import _BoundedFile, _check_size
from common.errors import DataError, UnreadableFileError, UnsupportedFormatError


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: sizes checked here
            with _BoundedFile(path) as fp, Image.open(fp, formats=PIL_FORMATS) as img:
                width, height = img.size
                to_rgb = img.mode in ("P", "PA", "RGBA", "CMYK", "YCbCr")
                bands = 3 if to_rgb else len(img.getbands())  # the channels it is read with
                _check_size((height, width, bands), path.name,
                            shown=f"{width} x {height} pixels x {bands} channel(s)")
                if to_rgb or img.mode == "LA":
                    img = img.convert("RGB" if img.mode != "LA" else "L")
                elif img.mode == "1":
                    img = img.convert("L")
                return np.asarray(img)
    except DataError:
        raise
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:
        raise UnsupportedFormatError(
            f"{path.name} claims a size over Pillow's decompression-bomb limit ({exc}); "
            f"if the size is real, downsample the image, otherwise the file is corrupt"
        ) from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, EOFError, ValueError, ...
        raise UnreadableFileError(
            f"cannot decode {path.name} as an image ({type(exc).__name__}: {exc}); "
            f"the file is damaged or not the image format its suffix says"
        ) from None


def _channels_first(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return np.moveaxis(array[..., :3], -1, 0)
    raise UnsupportedFormatError(f"2D image with unexpected shape {array.shape}")
