"""Shared DICOM fixtures and helpers: pydicom's sample files, generated instances, a running
DICOM node, and dcmtk's ``echoscu`` / ``storescu`` against it. Offline, tmp dirs, port 0.

Fixtures (``pytest_plugins = ["fixtures_dicom"]`` in a test module, or listed in conftest.py):

* ``dicom_samples``: list of :class:`Sample` (path, kind, UIDs, transfer syntax) of pydicom's own
  test files, each a distinct SOP instance: ``ct`` (CT, explicit VR), ``mr`` (MR), ``rgb``
  (RGB Secondary Capture, implicit VR), ``multiframe`` (US multi-frame, 30 frames, JPEG
  baseline), ``compressed`` (JPEG Lossless SV1: no decoder without pylibjpeg/GDCM, so stored
  but not displayable), ``j2k`` (JPEG 2000, CT). :data:`SAMPLES` names the files.
* ``dicom_data``: an empty data directory (``studies/`` inside it once a store opens).
* ``study_store``: an open :class:`edge.studies.store.StudyStore` in ``dicom_data``.
* ``dicom_node``: a factory ``dicom_node(**DicomNode kwargs) -> DicomNode``, started on a free
  port of 127.0.0.1 over ``study_store`` (stopped at teardown).

Helpers (plain functions): :func:`echoscu`, :func:`storescu` (picks the storescu flag that
proposes each file's transfer syntax), :func:`ct_instances` (N distinct CT slices made from
CT_small), :func:`big_dx` (a ~20 MB DX), :func:`free_port`.
"""

from __future__ import annotations

import copy
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

# kind -> pydicom test file (in pydicom/data/test_files, shipped with the package: no download)
SAMPLES = {
    "ct": "CT_small.dcm",
    "mr": "MR_small.dcm",
    "rgb": "SC_rgb_jpeg_dcmd.dcm",
    "multiframe": "examples_ybr_color.dcm",
    "compressed": "SC_rgb_jpeg_gdcm.dcm",
    "j2k": "693_J2KI.dcm",
}

# storescu proposes uncompressed syntaxes only unless told; the flag that proposes each file's own
STORESCU_FLAG = {
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG extended
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.5": "-xr",  # RLE
    "1.2.840.10008.1.2.1.99": "-xd",  # deflated
}


@dataclass(frozen=True)
class Sample:
    kind: str
    path: Path
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    frames: int


def sample_dir() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"


def read_sample(kind: str, path: Path) -> Sample:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return Sample(
        kind,
        path,
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
        str(ds.file_meta.TransferSyntaxUID),
        int(ds.get("NumberOfFrames") or 1),
    )


@pytest.fixture(scope="session")
def dicom_samples() -> list[Sample]:
    """pydicom's sample files, one per kind in :data:`SAMPLES` (distinct SOP instances)."""
    out = [read_sample(kind, sample_dir() / name) for kind, name in SAMPLES.items()]
    assert len({s.sop_instance_uid for s in out}) == len(out)
    return out


@pytest.fixture
def dicom_data(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def study_store(dicom_data):
    from edge.studies.store import StudyStore

    store = StudyStore(dicom_data / "studies")
    yield store
    store.close()


@pytest.fixture
def dicom_node(study_store):
    """``dicom_node(**kwargs)`` → a started DicomNode (port 0) over ``study_store``."""
    from android_bridge.dicom_node import DicomNode

    nodes = []

    def start(**kwargs) -> DicomNode:
        node = DicomNode(study_store, **{"port": 0, **kwargs})
        node.start()
        nodes.append(node)
        return node

    yield start
    for n in nodes:
        n.stop(grace_s=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echoscu(port: int, *, aet: str = "ECHOSCU", aec: str = "MEDGEMMA", timeout: float = 30):
    """dcmtk's C-ECHO against 127.0.0.1:port; the CompletedProcess (rc 0 = success)."""
    return subprocess.run(
        ["echoscu", "-aet", aet, "-aec", aec, "-to", "10", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def storescu(port: int, *files, aet: str = "STORESCU", aec: str = "MEDGEMMA", timeout: float = 120, extra=()):
    """dcmtk's C-STORE of ``files`` to 127.0.0.1:port, one association per transfer syntax (each
    with the flag that proposes it). Returns the CompletedProcesses; all rc 0 = all stored."""
    import pydicom

    groups: dict[str, list[str]] = {}
    for f in files:
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(STORESCU_FLAG.get(ts, ""), []).append(str(f))
    out = []
    for flag, names in groups.items():
        cmd = ["storescu", "-R", *([flag] if flag else []), "-aet", aet, "-aec", aec, "-to", "20", *extra]
        out.append(
            subprocess.run(
                [*cmd, "127.0.0.1", str(port), *names], capture_output=True, text=True, timeout=timeout
            )
        )
    return out


def ct_instances(n: int, *, series: int = 1, seed: int = 0) -> list:
    """``n`` distinct CT instances (pydicom Datasets) made from CT_small: new SOP Instance UIDs,
    one study, ``series`` series, instance numbers 1..n. Deterministic for a seed."""
    import pydicom
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(sample_dir() / SAMPLES["ct"])
    study = generate_uid(entropy_srcs=[f"study-{seed}"])
    series_uids = [generate_uid(entropy_srcs=[f"series-{seed}-{k}"]) for k in range(series)]
    out = []
    for i in range(n):
        ds = copy.deepcopy(base)  # Dataset.copy() is shallow: the copies would share their elements
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series_uids[i % series]
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[f"instance-{seed}-{i}"])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out


def write_instances(datasets, folder: Path) -> list[Path]:
    """Write pydicom Datasets as Part 10 files ``folder/0000.dcm``...; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = folder / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def big_dx(path: Path, *, mb: float = 20, seed: int = 0) -> Path:
    """A DX (for presentation) of about ``mb`` MB: 16-bit monochrome noise, explicit VR LE."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    side = int((mb * 1e6 / 2) ** 0.5)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4096, size=(side, side), dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"dx-{seed}"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"dx-study-{seed}"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"dx-series-{seed}"])
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.PatientName = "Synthetic^Chest"
    ds.PatientID = f"SYN{seed:04d}"
    ds.StudyDate, ds.StudyTime = "20260101", "101500"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
