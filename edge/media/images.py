"""Images in: PNG, JPEG (and anything else Pillow reads) and DICOM → an 8-bit RGB picture.

Both models take 8-bit RGB: MedGemma's projector (through llama.cpp) and MedSigLIP's tower (its
own resize/normalize in edge.medsiglip.preprocess). This module does everything before that:
limits against huge files and decompression bombs (checked from the header, before any pixel
is decoded), EXIF orientation, 16-bit and palette images, and for DICOM the modality LUT,
windowing (the file's window, else the 0.5–99.5 percentile range), MONOCHROME1 inversion,
colour spaces and the choice of one frame of a multi-frame file. Compressed transfer syntaxes
are decoded when a decoder is installed (Pillow handles JPEG baseline and JPEG 2000 here) and
otherwise refused with the syntax's name.

Nothing here logs patient identifiers: only sizes, modality, transfer syntax and timings.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edge.errors import InputError, MissingDependency, TooLargeError
from edge.files import read_bytes

log = logging.getLogger(__name__)

# the largest image file read (512 MiB; a path is read at most this + 1 bytes, regular files only)
MAX_FILE_BYTES = int(os.environ.get("MEDGEMMA_EDGE_MAX_IMAGE_BYTES", 512 << 20))
MAX_PIXELS = int(os.environ.get("MEDGEMMA_EDGE_MAX_IMAGE_PIXELS", 64_000_000))  # per frame
DICOM_MAGIC_OFFSET = 128


@dataclass
class LoadedImage:
    """A decoded image, ready for a model. ``key`` identifies its content (for caches)."""

    image: Image.Image  # mode "RGB", 8 bits per channel
    key: str  # sha256 of the file bytes (+ frame), hex
    format: str  # "png", "jpeg", "dicom", ...
    source_size: tuple[int, int]  # (width, height) as stored
    info: dict = field(default_factory=dict)  # non-identifying facts: modality, window, frame, ...

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _read(src: str | os.PathLike | bytes, max_bytes: int) -> tuple[bytes, str]:
    """The file's bytes (a path: read through :func:`edge.files.read_bytes`, regular files only,
    at most ``max_bytes``) and the name messages use for it."""
    if isinstance(src, bytes | bytearray | memoryview):
        data = bytes(src)
        name = "image"
    else:
        path = Path(src)
        name = path.name
        data = read_bytes(path, limit=max_bytes, what="image")
    if len(data) > max_bytes:
        raise TooLargeError(
            f"{name}: {len(data) / 2**20:.0f} MiB is over the {max_bytes / 2**20:.0f} MiB image limit"
        )
    if not data:
        raise InputError(f"{name} is empty, not an image")
    return data, name


def is_dicom(data: bytes) -> bool:
    return data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise TooLargeError(
            f"{name}: {width}x{height} is {width * height / 1e6:.0f} megapixels, over the "
            f"{max_pixels / 1e6:.0f} MP limit; downscale it first"
        )


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB. High-bit-depth greyscale is stretched over its own range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        return Image.fromarray(_stretch(a, float(a.min()), float(a.max()))).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def _stretch(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of [lo, hi] to [0, 255] as uint8 (constant images become 0)."""
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.clip((a - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def _load_pillow(data: bytes, name: str, max_pixels: int) -> tuple[Image.Image, str, tuple[int, int]]:
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:  # Pillow's own guard, far above ours
        raise TooLargeError(f"{name}: {exc}; downscale it first") from None
    except UnidentifiedImageError:
        raise InputError(f"{name} is not an image this runtime reads (PNG, JPEG or DICOM)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{name}: can't read the image header ({exc})") from None
    _check_pixels(name, img.width, img.height, max_pixels)
    fmt = (img.format or "unknown").lower()
    try:
        img.load()  # safe: the pixel count was checked against max_pixels above
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{name}: the {fmt.upper()} data is truncated or corrupt ({exc})") from None
    source_size = img.size
    img = ImageOps.exif_transpose(img)  # phone photos: honour the camera's orientation
    return to_rgb8(img), fmt, source_size


# --- DICOM -------------------------------------------------------------------------------------


def _first(value) -> float | None:
    if value is None:
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _load_dicom(data: bytes, name: str, max_pixels: int, frame: int | None) -> tuple[Image.Image, dict]:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise MissingDependency(
            f"{name} is a DICOM file; reading DICOM needs pydicom: pip install 'medgemma-edge[dicom]'"
        ) from None
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many types for damaged files
        raise InputError(f"{name}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InputError(
            f"{name}: this DICOM file has no pixel data (it is not an image: {ds.get('Modality', '?')})"
        )
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    frames = int(_first(ds.get("NumberOfFrames")) or 1)
    _check_pixels(name, cols, rows, max_pixels)
    index = (frames // 2 if frame is None else frame) if frames > 1 else (frame or 0)
    if not 0 <= index < frames:
        raise InputError(
            f"{name}: frame {index} does not exist (the file has {frames} frame(s), 0..{frames - 1})"
        )
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    ts_name = getattr(ts, "name", str(ts) if ts else "unknown")
    try:
        arr = ds.pixel_array if frames == 1 else _one_frame(ds, index)
    except (RuntimeError, NotImplementedError) as exc:
        if _is_compressed(ts):
            raise InputError(
                f"{name}: can't decode DICOM transfer syntax '{ts_name}' here (no decoder installed for it); "
                f"convert it to an uncompressed DICOM or PNG first"
            ) from None
        raise InputError(f"{name}: can't decode the DICOM pixel data ({exc})") from None
    except (ValueError, AttributeError, KeyError) as exc:
        raise InputError(f"{name}: the DICOM pixel data is truncated or inconsistent ({exc})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    info = {
        "modality": str(ds.get("Modality", "")),
        "photometric": photometric,
        "transfer_syntax": ts_name,
        "frames": frames,
        "frame": index,
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
    }
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds)
        rgb = (rgb / 257).astype(np.uint8) if rgb.dtype != np.uint8 else rgb
        return Image.fromarray(rgb, "RGB"), info
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour (pydicom returns RGB for YBR by default)
        rgb = arr[..., :3]
        if rgb.dtype != np.uint8:
            rgb = _stretch(rgb.astype(np.float64), float(rgb.min()), float(rgb.max()))
        return Image.fromarray(np.ascontiguousarray(rgb), "RGB"), info
    values = apply_modality_lut(arr, ds).astype(np.float64)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if "VOILUTSequence" in ds:
        windowed = apply_voi_lut(values, ds, index=0).astype(np.float64)
        out = _stretch(windowed, float(windowed.min()), float(windowed.max()))
        info["window"] = {"from": "file VOI LUT"}
    elif center is not None and width is not None and width > 0:
        out = _window(values, center, width)
        info["window"] = {"center": center, "width": width, "from": "file"}
    else:
        lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
        if hi <= lo:
            lo, hi = float(values.min()), float(values.max())
        out = _stretch(values, lo, hi)
        info["window"] = {"center": (lo + hi) / 2, "width": hi - lo, "from": "percentile 0.5-99.5"}
    if photometric == "MONOCHROME1":  # high values are dark: invert so the picture looks as intended
        out = 255 - out
    return Image.fromarray(out, "L").convert("RGB"), info


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear windowing (PS3.3 C.11.2.1.2.1) to 8 bits."""
    lo = center - 0.5 - (width - 1) / 2
    hi = center - 0.5 + (width - 1) / 2
    return _stretch(np.clip(values, lo, hi), lo, hi)


def _is_compressed(ts) -> bool:
    """Whether a transfer syntax UID names a compressed syntax; False for a UID that is not a
    transfer syntax at all (pydicom raises ValueError asking a corrupted one)."""
    try:
        return ts is not None and bool(ts.is_transfer_syntax and ts.is_compressed)
    except (AttributeError, ValueError):
        return False


def _one_frame(ds, index: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    return pixel_array(ds, index=index)


# --- entry point -------------------------------------------------------------------------------


def load_image(
    src: str | os.PathLike | bytes,
    *,
    frame: int | None = None,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_FILE_BYTES,
) -> LoadedImage:
    """Decode ``src`` (a path or the file's bytes) into 8-bit RGB within the size limits.

    Args:
        frame: which frame of a multi-frame DICOM (default: the middle one).
    Raises:
        InputError: not an image, truncated or corrupt, DICOM without pixels or with an
            undecodable transfer syntax, a frame that doesn't exist.
        TooLargeError: the file or its pixel count is over the limit (checked before decoding).
        MissingDependency: a DICOM file without pydicom installed.
    """
    t0 = time.perf_counter()
    data, name = _read(src, max_bytes)
    digest = hashlib.sha256(data)
    if is_dicom(data):
        img, info = _load_dicom(data, name, max_pixels, frame)
        fmt, source_size = "dicom", img.size
        digest.update(f"#frame={info['frame']}".encode())
    else:
        if frame not in (None, 0):
            raise InputError(f"{name}: --frame applies to multi-frame DICOM files only")
        img, fmt, source_size = _load_pillow(data, name, max_pixels)
        info = {}
    log.info(
        "image %s: %s %dx%d -> RGB %dx%d in %.0f ms",
        digest.hexdigest()[:12],
        fmt,
        *source_size,
        *img.size,
        (time.perf_counter() - t0) * 1e3,
    )
    return LoadedImage(img, digest.hexdigest(), fmt, source_size, info)
