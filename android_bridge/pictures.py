"""Small pictures for people to look at: the preview of an image as the runtime sees it, and
thumbnails of indexed cases.

Browsers can't show DICOM, and even for PNG/JPEG what the models see differs from the file
(DICOM windowing, EXIF rotation, 16-bit stretching, alpha on black): a preview is made from
:func:`edge.media.images.load_image`'s output, downscaled, as a PNG data URL. Thumbnails of the
similar-case index are read from the paths the index records (its own copies, else the files
it was built from) and kept in a small LRU keyed by the case's content hash, so repeated
searches don't decode the same DICOM again. Nothing here logs paths or pixels.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from collections import OrderedDict

from PIL import Image

from edge.errors import EdgeError
from edge.media.images import LoadedImage, load_image

log = logging.getLogger(__name__)

PREVIEW_MAX_SIDE = 1024
THUMBNAIL_SIDES = (32, 512)  # the smallest and largest thumbnail a request may ask for


def png_data_url(image: Image.Image, max_side: int) -> tuple[str, tuple[int, int]]:
    """``image`` downscaled to fit ``max_side`` (never upscaled) as a PNG data URL, and its size."""
    small = image.copy()
    small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=False, compress_level=3)  # speed over bytes: loopback
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), small.size


def preview(loaded: LoadedImage, *, max_side: int = PREVIEW_MAX_SIDE) -> dict:
    """What a page shows for an image: the picture the models get, and non-identifying facts."""
    url, size = png_data_url(loaded.image, max_side)
    return {
        "image": url,
        "preview_size": list(size),
        "size": list(loaded.size),  # after EXIF rotation / DICOM decoding: what the models take
        "source_size": list(loaded.source_size),
        "format": loaded.format,
        "info": loaded.info,  # DICOM: modality, window, frames, frame, transfer syntax, bits
    }


class Thumbnails:
    """Thumbnails of indexed cases, decoded once per (content hash, side). Thread-safe."""

    def __init__(self, max_entries: int = 256):
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple[str, int], str | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | None, content_hash: str, side: int) -> str | None:
        """A PNG data URL of the case at ``path``, or None when the file is gone or unreadable
        (a moved source file must not fail the whole search)."""
        if not path:
            return None
        key = (content_hash or path, side)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            url, _ = png_data_url(load_image(path).image, side)
        except (EdgeError, OSError) as exc:
            log.info("thumbnail of case %s unavailable (%s)", (content_hash or "?")[:12], type(exc).__name__)
            url = None
        with self._lock:
            self._cache[key] = url
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return url
