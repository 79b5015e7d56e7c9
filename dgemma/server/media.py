"""Images in chat requests: OpenAI `image_url` content parts -> decoded pictures, with no network fetches.

A part's url is a `data:image/...;base64,` URL, or, only when the server was started with --allowed-local-media
DIR, a local path (or file:// URL) inside DIR. http(s) URLs are refused: the server fetches nothing."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import DgemmaError
from ..image_files import MAX_IMAGE_BYTES, MAX_REQUEST_PIXELS, ImageError, EncodedImage, open_image, read_image


MAX_PATH_CHARS = 4096  # Linux's PATH_MAX


class MediaError(DgemmaError, ValueError):
    """A content part that names an image the server will not read; answered 400 naming `messages`."""


def _url(part: dict, where: str) -> str:
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise MediaError(f"{where}: an image_url part needs image_url.url")
    return url


def load_picture(url: str, where: str, allowed_dir: Path | None) -> EncodedImage:
    """One image_url's picture, its header checked (decoded later, when it is preprocessed), or MediaError /
    ImageError naming `where`."""
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme in ("http", "https"):
        raise MediaError(f"{where}: this server makes no network fetches; send the image inline as a "
                         f"data:image/...;base64 URL")
    if scheme == "data":
        head, _, payload = url.partition(",")
        if not head.lower().endswith(";base64") or not head[5:].lower().startswith("image/"):
            raise MediaError(f"{where}: a data URL must be data:image/<format>;base64,<data>")
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise MediaError(f"{where}: the image is larger than the {MAX_IMAGE_BYTES // 2**20} MiB limit")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError(f"{where}: the data URL is not valid base64") from None
        return open_image(data, where)
    if scheme not in ("", "file") and not (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
        raise MediaError(f"{where}: unsupported URL scheme {scheme!r:.20}; use a data:image/...;base64 URL")
    if allowed_dir is None:
        raise MediaError(f"{where}: local image paths are off; start the server with --allowed-local-media DIR")
    if len(url) > MAX_PATH_CHARS:
        raise MediaError(f"{where}: a local path of {len(url)} characters is longer than the {MAX_PATH_CHARS} "
                         f"allowed")
    path = Path(unquote(urlparse(url).path) if scheme == "file" else url)
    if "\x00" in str(path):
        raise MediaError(f"{where}: the path holds a NUL character")
    try:
        root = allowed_dir.resolve()
        resolved = (root / path).resolve() if not path.is_absolute() else path.resolve()
        if not resolved.is_relative_to(root):
            raise MediaError(f"{where}: {url!r:.200} is outside the allowed media directory")
        return read_image(resolved)
    except ImageError as e:
        raise ImageError(f"{where}: {e}") from None
    except OSError as e:  # a name too long for the file system, a loop of links, no permission
        raise MediaError(f"{where}: cannot read {url!r:.80}: {e.strerror or type(e).__name__}") from None


def take_images(messages: list[dict], allowed_dir: Path | None, max_images: int) -> tuple[list[dict], list]:
    """Messages with each image_url part replaced by {"type": "image"} (which the chat template renders as the
    image placeholder), and the pictures in order (EncodedImage: decoded when preprocessed). At most `max_images`
    pictures and MAX_REQUEST_PIXELS pixels, counted from their headers before any is decoded."""
    found = [(i, j) for i, m in enumerate(messages) if isinstance(m.get("content"), list)
             for j, part in enumerate(m["content"]) if isinstance(part, dict) and part.get("type") == "image_url"]
    if len(found) > max_images:
        raise MediaError(f"messages: {len(found)} images, more than this server's limit of {max_images} "
                         f"(--max-images-per-request)")
    out = [dict(m, content=list(m["content"])) if isinstance(m.get("content"), list) else m for m in messages]
    pictures = []
    for i, j in found:
        where = f"messages[{i}].content[{j}].image_url"
        pictures.append(load_picture(_url(out[i]["content"][j], where), where, allowed_dir))
        out[i]["content"][j] = {"type": "image"}
    pixels = sum(p.pixels for p in pictures)
    if pixels > MAX_REQUEST_PIXELS:
        raise MediaError(f"messages: the images hold {pixels:,} pixels, more than the {MAX_REQUEST_PIXELS:,} one "
                         f"request may send (every image is resized to a few hundred thousand pixels: send smaller "
                         f"pictures)")
    return out, pictures
