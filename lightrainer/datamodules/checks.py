"""Checks of image files before a run starts: a damaged image or a decompression bomb is refused
by name while nothing is created yet, instead of failing a DataLoader worker mid-epoch.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterable, Optional

from lightrainer.errors import ConfigError, MissingDependencyError

#: Pixels an image may have (width x height): Pillow's own default limit, about 89 million
#: (a 9459 x 9459 image). A 20000 x 20000 PNG of a few KB would need 1.6 GB to decode.
MAX_IMAGE_PIXELS = 89_478_485


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError("reading image folders needs Pillow: pip install pillow") from None
    return Image


def image_problem(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS, decode: bool = False) -> Optional[str]:
    """What is wrong with one image file, or None when it is fine.

    The header is read and the size checked before anything is decoded, then Pillow's
    ``verify()`` checks the file's structure (PNG chunks and checksums); ``decode`` also decodes
    the pixels, which finds a truncated JPEG that ``verify`` lets through, at the cost of a full
    read.

    Args:
        path: the image file.
        max_pixels: largest width x height accepted (a decompression bomb is refused).
        decode: decode the pixels too.
    """
    Image = _pillow()
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit and raises above twice it; the limit here is ours.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return f"{width}x{height} pixels, more than {max_pixels} (a decompression bomb?)"
                image.verify()
            if decode:
                with Image.open(path) as image:
                    image.load()
    except Image.DecompressionBombError as err:
        return f"too large to decode ({err})"
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # Pillow's UnidentifiedImageError is an OSError
        return f"not a readable image ({type(err).__name__}: {err})"
    return None


def check_images(
    paths: Iterable[str | os.PathLike], max_pixels: int = MAX_IMAGE_PIXELS, decode: bool = False, most: int = 5
) -> None:
    """Refuse a set of images when any of them is damaged, not an image, or larger than
    ``max_pixels``; meant to run before the run folder exists.

    Args:
        paths: the image files.
        max_pixels: largest width x height accepted.
        decode: decode every image fully (see :func:`image_problem`).
        most: bad files named in the message.

    Raises:
        ConfigError: naming the bad files (the first ``most``), how many there are, and the fix.
        MissingDependencyError: Pillow is not installed.
    """
    paths = list(paths)
    bad = [(path, problem) for path in paths if (problem := image_problem(path, max_pixels, decode)) is not None]
    if not bad:
        return
    named = "; ".join(f"{path}: {problem}" for path, problem in bad[:most])
    more = f"; and {len(bad) - most} more" if len(bad) > most else ""
    raise ConfigError(
        f"{len(bad)} of {len(paths)} image(s) cannot be used: {named}{more}. Remove or replace them"
    )
