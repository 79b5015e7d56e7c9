"""Image files and bytes -> RGB pictures, with bounded memory: a picture is checked by its header first (format,
pixel count), and decoded only when it is preprocessed, in one of a few decode slots shared by all requests.

Decoding (step 1 of images.py): decode with Pillow, then convert to RGB, transparency composited onto white as
transformers' image processor does it.
"""

from __future__ import annotations

import ctypes
import io
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import DgemmaError

# Pillow refuses (DecompressionBombError) an image over twice this many pixels and warns over it; dgemma makes the
# warning an error too, so nothing past this is decoded. 40 MP: a 7,000 x 5,700 photo; every image is resized to
# at most a few hundred thousand pixels anyway.
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 50 * 2**20
# a request's images together: 64 MP is five 12 MP photos, or one picture at the limit; every image becomes at most
# a few hundred soft tokens, so larger pictures only cost decoding time (about 5 s for 40 MP on one core)
MAX_REQUEST_PIXELS = 64_000_000
COMPOSITE_BAND_PIXELS = 1 << 20  # transparency is composited this many pixels at a time
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class ImageError(DgemmaError, ValueError):
    """An image that cannot be used, or an image request a model cannot serve. One line naming the image."""


class DecodeSlots:
    """At most `n` images decoded at once, in all requests together: while it is decoded, composited and resized an
    image holds up to 8 bytes a pixel (its decoded copy and its RGB copy, 4 bytes a pixel each in Pillow), so
    decoding takes at most n * 8 * MAX_IMAGE_PIXELS bytes. Counts the decodes waiting and running."""

    def __init__(self, n: int):
        self.n = n
        self._free = threading.BoundedSemaphore(n)
        self._lock = threading.Lock()
        self.waiting = self.decoding = 0

    def __enter__(self) -> DecodeSlots:
        with self._lock:
            self.waiting += 1
        self._free.acquire()
        with self._lock:
            self.waiting -= 1
            self.decoding += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.decoding -= 1
        self._free.release()


DECODE_SLOTS = DecodeSlots(2)
TRIM_PIXELS = 4_000_000  # after decoding an image this large, hand the freed memory back to the system


def return_freed_memory() -> None:
    """glibc keeps the blocks a large decode freed in its heaps (a thread's arena does not shrink on its own), so the
    process would keep its peak size; malloc_trim hands them back. Nothing to do elsewhere."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # musl and others: no malloc_trim
        return None


_LIBC = _glibc()


def _pil():
    from PIL import Image, ImageFile

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    return Image


@dataclass
class EncodedImage:
    """An image checked by its header (a supported format, at most MAX_IMAGE_PIXELS) but not decoded yet: its bytes,
    or the file that holds them. Decoding waits for one of DECODE_SLOTS (preprocess), so the pictures of many
    requests cost their compressed size until their turn comes."""

    name: str
    width: int
    height: int
    data: bytes | None = None
    path: Path | None = None

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def decode(self):
        """1. The RGB PIL image (at full size), or ImageError naming the image."""
        image = _open(io.BytesIO(self.data) if self.data is not None else self.path, self.name)
        Image = _pil()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image.load()
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                image.close()
                raise ImageError(f"{self.name}: the image is corrupt or truncated "
                                 f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
        rgb = _to_rgb(image)
        if rgb is not image:
            image.close()
        return rgb


def _open(source, name: str):
    """PIL's Image.open (the header only) with dgemma's formats and pixel limit; ImageError naming `name`."""
    Image = _pil()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(source, formats=FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{name}: the image is too large to decode (over {MAX_IMAGE_PIXELS:,} pixels; a "
                             f"decompression bomb?)") from None
        except Image.UnidentifiedImageError:
            raise ImageError(f"{name}: not an image in a supported format ({', '.join(FORMATS)})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"{name}: the image is corrupt or truncated ({str(e).splitlines()[0][:120]})") from None
    if image.width * image.height == 0:
        image.close()
        raise ImageError(f"{name}: the image is empty ({image.width}x{image.height})")
    return image


def open_image(data: bytes, name: str = "image") -> EncodedImage:
    """Bytes -> an EncodedImage, or ImageError naming `name` and the problem. Only the header is read: nothing past
    the pixel limit is ever decoded."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{name}: {len(data)} bytes is larger than the {MAX_IMAGE_BYTES // 2**20} MiB limit")
    image = _open(io.BytesIO(data), name)
    image.close()
    return EncodedImage(name, image.width, image.height, data=data)


def decode_image(data: bytes, name: str = "image"):
    """Bytes -> an RGB PIL image (1.), or ImageError naming `name` and the problem."""
    return open_image(data, name).decode()


def _to_rgb(image):
    """The image in RGB, transparency composited onto white, as transformers' convert_to_rgb does it; a large image
    is composited a band of rows at a time, so it never holds more than itself and its RGB copy."""
    Image = _pil()
    if image.mode == "RGB":
        return image
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    rgb = Image.new("RGB", rgba.size)
    rows = max(1, COMPOSITE_BAND_PIXELS // rgba.width)
    for top in range(0, rgba.height, rows):
        band = rgba.crop((0, top, rgba.width, min(rgba.height, top + rows)))
        white = Image.new("RGBA", band.size, (255, 255, 255, 255))
        rgb.paste(Image.alpha_composite(white, band).convert("RGB"), (0, top))
    if rgba is not image:
        rgba.close()
    return rgb


def read_image(path: str | Path) -> EncodedImage:
    """A file -> an EncodedImage (its header checked; decoded when preprocessed), or ImageError."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{str(path)[:200]}: no such image file")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ImageError(f"{path}: {path.stat().st_size} bytes is larger than the {MAX_IMAGE_BYTES // 2**20} MiB "
                         f"limit")
    image = _open(path, str(path))
    image.close()
    return EncodedImage(str(path), image.width, image.height, path=path)
