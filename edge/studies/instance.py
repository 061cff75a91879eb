"""What the catalogue records of one DICOM instance, read from its bytes, and whether it can be shown.

:func:`read_facts` parses a DICOM Part 10 byte string (preamble, ``DICM``, file meta, data set)
with pydicom and returns :class:`Facts`: the study / series / instance identity, the patient and
study fields the page shows, the image geometry and transfer syntax, and the *displayable*
verdict. An instance is displayable when it has pixel data, a frame within the image path's
pixel limit, complete native pixel data, and pydicom on this device has a working pixel decoder
for its transfer syntax (``pydicom.pixels`` decoders' ``is_available``: JPEG 2000 needs Pillow's
OpenJPEG or pylibjpeg, JPEG Lossless needs pylibjpeg or GDCM, ...). Otherwise ``why_not`` says
why, naming the syntax: "JPEG Lossless, ... (1.2.840.10008.1.2.4.70): no decoder on this device".

Nothing here logs: the values are patient data.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
from dataclasses import dataclass

from edge.errors import InputError, require

DICM_OFFSET = 128
_UID = re.compile(r"[0-9A-Za-z.\-_]{1,64}")  # PS3.5 allows digits and dots; some devices are sloppier
_MAX_TEXT = 256  # the longest text kept per field (LO is 64 chars; PN up to 64 per component group)
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage


class InvalidInstance(InputError):
    """DICOM, but not an instance the store can keep: a DICOMDIR, or without the UIDs it needs."""


@dataclass(frozen=True)
class Facts:
    """One instance as the catalogue stores it (strings empty, numbers None when absent)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient_name: str
    patient_id: str
    patient_birth_date: str | None  # YYYY-MM-DD
    patient_sex: str
    study_date: str | None  # YYYY-MM-DD
    study_time: str | None  # HH:MM:SS
    study_description: str
    accession: str
    modality: str
    body_part: str
    series_number: int | None
    series_description: str
    instance_number: int | None
    frames: int  # 0: no pixel data
    rows: int | None
    columns: int | None
    transfer_syntax: str
    displayable: bool
    why_not: str | None


def uid_hash(uid: str) -> str:
    """What logs carry instead of a UID: the first 12 hex digits of its sha256."""
    return hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:12]


def is_part10(head: bytes) -> bool:
    """Whether ``head`` (the first 132 bytes or more) starts like a DICOM Part 10 file."""
    return head[DICM_OFFSET : DICM_OFFSET + 4] == b"DICM"


def read_facts(data: bytes, *, name: str = "instance") -> Facts:
    """Parse ``data`` (a DICOM Part 10 file's bytes) into :class:`Facts`.

    Raises:
        InputError: not DICOM Part 10, unreadable, a DICOMDIR, or without the UIDs every stored
            instance needs (study, series, SOP instance, SOP class). The messages carry no values.
    """
    pydicom = _pydicom()
    if not is_part10(data):
        raise InputError(f"{name} is not a DICOM file (no DICM marker at byte 128)")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), defer_size=None)
        meta = ds.file_meta
        ts = str(meta.get("TransferSyntaxUID", "") or "").strip()
    except Exception as exc:  # pydicom raises many types for damaged files; its messages may hold values
        raise InputError(f"{name}: not a readable DICOM file ({type(exc).__name__})") from None
    sop_class = _uid(ds, "SOPClassUID") or _uid(meta, "MediaStorageSOPClassUID")
    if sop_class == DICOMDIR_CLASS:
        raise InvalidInstance(f"{name} is a DICOMDIR (an index of the media), not an instance")
    ids = {
        "StudyInstanceUID": _uid(ds, "StudyInstanceUID"),
        "SeriesInstanceUID": _uid(ds, "SeriesInstanceUID"),
        "SOPInstanceUID": _uid(ds, "SOPInstanceUID") or _uid(meta, "MediaStorageSOPInstanceUID"),
        "SOPClassUID": sop_class,
    }
    missing = [k for k, v in ids.items() if not v]
    if missing:
        raise InvalidInstance(f"{name}: no valid {', '.join(missing)}; it can't be stored as an instance")
    if not ts:
        raise InvalidInstance(f"{name}: its file meta has no Transfer Syntax UID")
    has_pixels = any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    frames = (_int(ds, "NumberOfFrames") or 1) if has_pixels else 0
    displayable, why_not = _verdict(ds, ts, has_pixels, rows, cols, frames, sop_class)
    return Facts(
        study_uid=ids["StudyInstanceUID"],
        series_uid=ids["SeriesInstanceUID"],
        sop_instance_uid=ids["SOPInstanceUID"],
        sop_class_uid=sop_class,
        patient_name=_text(ds, "PatientName"),
        patient_id=_text(ds, "PatientID"),
        patient_birth_date=iso_date(_text(ds, "PatientBirthDate")),
        patient_sex=_text(ds, "PatientSex")[:16],
        study_date=iso_date(_text(ds, "StudyDate")),
        study_time=iso_time(_text(ds, "StudyTime")),
        study_description=_text(ds, "StudyDescription"),
        accession=_text(ds, "AccessionNumber"),
        modality=_text(ds, "Modality")[:16],
        body_part=_text(ds, "BodyPartExamined")[:64],
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        instance_number=_int(ds, "InstanceNumber"),
        frames=frames,
        rows=rows,
        columns=cols,
        transfer_syntax=ts,
        displayable=displayable,
        why_not=why_not,
    )


@functools.cache
def _pydicom():
    """pydicom, with its value-validation warnings off: they quote element values (patient
    data) into the log and onto stderr. Reading is otherwise unchanged."""
    pydicom = require("pydicom", "dicom")
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return pydicom


def uid_name(uid: str) -> str:
    """pydicom's name of a registered UID (a SOP class, a transfer syntax); the UID itself if unknown."""
    from pydicom.uid import UID

    try:
        name = UID(uid).name
    except Exception:
        return uid
    return name or uid


@functools.lru_cache(maxsize=64)
def decoder_available(ts: str) -> bool:
    """Whether pydicom on this device can decode pixel data in transfer syntax ``ts``."""
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(ts).is_available)
    except (NotImplementedError, ValueError):  # no decoder for this UID at all; not a syntax
        return False


def _verdict(ds, ts, has_pixels, rows, cols, frames, sop_class) -> tuple[bool, str | None]:
    if not has_pixels:
        return False, f"no pixel data ({uid_name(sop_class)})"
    if not rows or not cols:
        return False, "no image size (Rows/Columns missing)"
    if not decoder_available(ts):
        return False, f"{uid_name(ts)} ({ts}): no decoder on this device"
    from edge.media.images import MAX_PIXELS

    if rows * cols > MAX_PIXELS:
        return False, f"{cols}x{rows} pixels per frame is over this device's {MAX_PIXELS:,}-pixel limit"
    short = _native_shortfall(ds, ts, rows, cols, frames)
    if short:
        return False, short
    return True, None


def _native_shortfall(ds, ts, rows, cols, frames) -> str | None:
    """For native (uncompressed) pixel data: a reason when it holds fewer bytes than the image needs."""
    from pydicom.uid import UID

    try:
        if UID(ts).is_compressed or "PixelData" not in ds:
            return None
        bits = _int(ds, "BitsAllocated") or 0
        samples = _int(ds, "SamplesPerPixel") or 1
        have = len(ds["PixelData"].value or b"")
    except Exception:
        return "the pixel data can't be read"
    need = (rows * cols * frames * samples * bits + 7) // 8
    if bits and have < need:
        return f"the pixel data is truncated ({have} of {need} bytes)"
    return None


def _get(ds, keyword: str):
    try:
        return ds.get(keyword)
    except Exception:  # an invalid value pydicom refuses to convert
        return None


def _uid(ds, keyword: str) -> str:
    value = str(_get(ds, keyword) or "").strip().rstrip("\0")
    return value if _UID.fullmatch(value) else ""


def _text(ds, keyword: str) -> str:
    value = _get(ds, keyword)
    if value is None:
        return ""
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue | list | tuple):  # a multi-valued element
        value = "\\".join(str(v) for v in value)
    text = str(value).replace("\0", "").strip()
    return "".join(c for c in text if c.isprintable())[:_MAX_TEXT]


def _int(ds, keyword: str) -> int | None:
    value = _get(ds, keyword)
    if value is None or value == "":
        return None
    try:
        return int(value[0] if isinstance(value, list | tuple) else value)
    except (TypeError, ValueError, IndexError):
        return None


_DATE = re.compile(r"(\d{4})[.\-]?(\d{2})[.\-]?(\d{2})")
_TIME = re.compile(r"(\d{2})(?::?(\d{2}))?(?::?(\d{2}))?")


def iso_date(value: str) -> str | None:
    """DICOM DA (``YYYYMMDD``; the old ``YYYY.MM.DD`` too) as ``YYYY-MM-DD``; None when not a date."""
    m = _DATE.fullmatch(value.strip())
    if not m:
        return None
    y, mo, d = (int(g) for g in m.groups())
    if not (1 <= mo <= 12 and 1 <= d <= 31):
        return None
    return f"{y:04d}-{mo:02d}-{d:02d}"


def iso_time(value: str) -> str | None:
    """DICOM TM (``HH[MM[SS[.ffffff]]]``; old ``HH:MM:SS`` too) as ``HH:MM:SS``; None when not a time."""
    m = _TIME.fullmatch(value.strip().split(".")[0])
    if not m:
        return None
    h, mi, s = (int(g or 0) for g in m.groups())
    if h > 23 or mi > 59 or s > 60:
        return None
    return f"{h:02d}:{mi:02d}:{min(s, 59):02d}"
