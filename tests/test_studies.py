"""The study store (edge/studies): content-addressed files, the SQLite catalogue, duplicates,
torn writes and orphans, a full disk, folder import, thread safety, and logs without patient data."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from fixtures_dicom import ct_instances, sample_dir, write_instances

from edge.errors import InputError, NotFoundError, ResourceError, TooLargeError, UsageError
from edge.media.images import load_image
from edge.studies import store as store_mod
from edge.studies.store import StudyStore, uid_hash

pytest_plugins = ["fixtures_dicom"]


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _objects(root: Path) -> list[Path]:
    return sorted(p for p in (root / "objects").rglob("*") if p.is_file())


def test_samples_are_catalogued_with_their_uids_and_displayability(study_store, dicom_samples):
    for s in dicom_samples:
        got = study_store.add_file(s.path)
        assert got.status == "stored"
        assert (got.study_uid, got.series_uid, got.sop_instance_uid) == (
            s.study_uid,
            s.series_uid,
            s.sop_instance_uid,
        )
        assert got.sha256 == hashlib.sha256(s.path.read_bytes()).hexdigest()
        assert study_store.object_path(got.sha256).read_bytes() == s.path.read_bytes()  # exactly as given
        info = study_store.instance_info(s.study_uid, s.sop_instance_uid)
        assert info["transfer_syntax"] == s.transfer_syntax and info["frames"] == s.frames
        if s.kind == "compressed":  # JPEG Lossless: no decoder here (pylibjpeg / GDCM not installed)
            assert not got.displayable
            assert got.why_not.startswith("JPEG Lossless") and "1.2.840.10008.1.2.4.70" in got.why_not
            assert "no decoder on this device" in got.why_not
        else:
            assert got.displayable and got.why_not is None, (s.kind, got.why_not)
        # the verdict is the image path's: what is displayable decodes, what is not says why
        path = study_store.instance_path(s.study_uid, s.sop_instance_uid)
        if got.displayable:
            assert load_image(path).image.size[0] > 0
        else:
            with pytest.raises(InputError, match="can't decode DICOM transfer syntax"):
                load_image(path)
    page = study_store.list_studies()
    assert page["total"] == len(dicom_samples) and page["offset"] == 0 and page["limit"] == 50
    assert [st["study_uid"] for st in page["studies"]] == [s.study_uid for s in reversed(dicom_samples)]
    for s in dicom_samples:
        st = study_store.get_study(s.study_uid)
        (series,) = st["series"]
        assert series["series_uid"] == s.series_uid
        assert [i["sop_instance_uid"] for i in series["instances"]] == [s.sop_instance_uid]
        assert study_store.instance_path(s.study_uid, s.sop_instance_uid).is_file()
    assert study_store.check()["ok"]


def test_catalogue_fields_of_ct_small(study_store, dicom_samples):
    ct = next(s for s in dicom_samples if s.kind == "ct")
    study_store.add_file(ct.path)
    st = study_store.get_study(ct.study_uid)
    assert st["patient_name"] == "CompressedSamples^CT1" and st["patient_id"] == "1CT1"
    assert st["study_date"] == "2004-01-19" and st["study_time"] == "07:27:30"
    assert st["modalities"] == ["CT"] and st["patient_sex"] == "O"
    assert (st["series_count"], st["instance_count"], st["displayable_count"]) == (1, 1, 1)
    assert st["received"].endswith("Z") and st["calling_ae"] == ""
    inst = st["series"][0]["instances"][0]
    assert (
        inst["sop_class"] == "CT Image Storage"
        and inst["transfer_syntax_name"] == "Explicit VR Little Endian"
    )
    assert (inst["rows"], inst["columns"], inst["frames"]) == (128, 128, 1)
    assert inst["bytes"] == ct.path.stat().st_size


def test_duplicates_change_nothing(study_store, dicom_samples):
    ct = next(s for s in dicom_samples if s.kind == "ct")
    first = study_store.add_file(ct.path)
    again = study_store.add_file(ct.path)
    assert again.status == "duplicate" and again.sha256 == first.sha256
    # the same SOP Instance UID with other bytes: still a duplicate, the stored file is kept
    import pydicom

    ds = pydicom.dcmread(ct.path)
    ds.StudyDescription = "edited after sending"
    other = study_store.add_bytes(_bytes(ds))
    assert other.status == "duplicate" and other.sha256 == first.sha256
    assert len(_objects(study_store.root)) == 1
    assert study_store.counts()["instances"] == 1


def test_list_paging_filters_and_bad_arguments(study_store, dicom_samples):
    for s in dicom_samples:
        study_store.add_file(s.path)
    n = len(dicom_samples)
    pages = [study_store.list_studies(offset=o, limit=2) for o in range(0, n, 2)]
    uids = [st["study_uid"] for p in pages for st in p["studies"]]
    assert uids == [s.study_uid for s in reversed(dicom_samples)] and all(p["total"] == n for p in pages)
    assert [st["modalities"] for st in study_store.list_studies(modality="ct")["studies"]] == [["CT"], ["CT"]]
    dated = study_store.list_studies(date_from="2004-01-01", date_to="20040131")
    assert [st["study_uid"] for st in dated["studies"]] == [dicom_samples[0].study_uid]
    assert study_store.list_studies(modality="XA")["total"] == 0
    for bad in ({"limit": 0}, {"limit": 201}, {"offset": -1}, {"limit": "5"}, {"date_from": "yesterday"}):
        with pytest.raises(UsageError):
            study_store.list_studies(**bad)


def test_unknown_study_and_instance_are_not_found(study_store, dicom_samples):
    ct = dicom_samples[0]
    study_store.add_file(ct.path)
    for call in (
        lambda: study_store.get_study("1.2.3"),
        lambda: study_store.instance_info(ct.study_uid, "1.2.3"),
        lambda: study_store.instance_path("1.2.3", ct.sop_instance_uid),  # an instance of another study
        lambda: study_store.first_displayable("1.2.3"),
    ):
        with pytest.raises(NotFoundError) as e:
            call()
        assert "1.2.3" not in str(e.value)  # UIDs stay out of messages (they get logged): hashes only
    assert study_store.first_displayable(ct.study_uid) == ct.sop_instance_uid
    assert study_store.newest() == (ct.study_uid, ct.sop_instance_uid)


def test_not_dicom_and_incomplete_instances_are_refused(study_store, tmp_path):
    with pytest.raises(InputError, match="not a DICOM file"):
        study_store.add_bytes(b"\x89PNG" + b"\0" * 200)
    import pydicom

    ds = pydicom.dcmread(sample_dir() / "CT_small.dcm")
    del ds.SeriesInstanceUID
    with pytest.raises(InputError, match="SeriesInstanceUID"):
        study_store.add_bytes(_bytes(ds))
    with pytest.raises(InputError, match="DICOMDIR"):
        study_store.add_file(sample_dir() / "dicomdirtests" / "DICOMDIR")
    assert study_store.counts()["instances"] == 0 and not _objects(study_store.root)


def test_size_limit_and_bounded_reads(study_store, monkeypatch, dicom_samples):
    monkeypatch.setattr(store_mod, "MAX_INSTANCE_BYTES", 1000)
    with pytest.raises(TooLargeError):
        study_store.add_file(dicom_samples[0].path)
    with pytest.raises(TooLargeError):
        study_store.add_bytes(dicom_samples[0].path.read_bytes())
    with pytest.raises(InputError, match="not a regular file"):
        study_store.add_file("/dev/zero")


def test_add_dataset_encodes_in_its_own_syntax(study_store):
    (ds,) = ct_instances(1, seed=3)
    got = study_store.add_dataset(ds, calling_ae="CT01")
    assert got.status == "stored" and got.displayable
    assert study_store.get_study(ds.StudyInstanceUID)["calling_ae"] == "CT01"
    del ds.file_meta
    with pytest.raises(InputError, match="file meta"):
        study_store.add_dataset(ds)


def test_import_folder_skips_what_is_not_dicom(study_store, tmp_path, dicom_samples):
    src = tmp_path / "usb"
    (src / "DICOM" / "ST000").mkdir(parents=True)
    for i, s in enumerate(dicom_samples[:3]):
        shutil.copyfile(s.path, src / "DICOM" / "ST000" / f"IM{i:04d}")
    write_instances(ct_instances(4, seed=1), src / "DICOM" / "ST001")
    shutil.copyfile(sample_dir() / "dicomdirtests" / "DICOMDIR", src / "DICOMDIR")
    (src / "README.TXT").write_text("CR reader export\n")
    (src / "DICOM" / "empty.dcm").write_bytes(b"")
    seen = []
    rep = study_store.import_folder(src, progress=lambda done, total: seen.append((done, total)))
    assert (rep["stored"], rep["duplicates"]) == (7, 0)
    why = dict(rep["skipped"])
    assert set(why) == {"DICOMDIR", "README.TXT", os.path.join("DICOM", "empty.dcm")}
    assert "DICOMDIR" in why["DICOMDIR"] and "no DICM marker" in why["README.TXT"]
    assert seen[-1] == (10, 10)
    again = study_store.import_folder(src)
    assert (again["stored"], again["duplicates"]) == (0, 7)
    assert study_store.counts() == {"studies": 4, "series": 4, "instances": 7, "bytes": rep["bytes"]}
    with pytest.raises(InputError, match="does not exist"):
        study_store.import_folder(tmp_path / "nowhere")


def test_torn_write_never_has_a_row_and_the_next_open_cleans_up(dicom_data, dicom_samples):
    root = dicom_data / "studies"
    with StudyStore(root) as st:
        st.add_file(dicom_samples[0].path)
        # a writer killed mid-write leaves a temp file; one killed after the rename, a whole file
        (root / "tmp" / "4242-deadbeef.part").write_bytes(dicom_samples[1].path.read_bytes()[:500])
        orphan = dicom_samples[2].path.read_bytes()
        sha = hashlib.sha256(orphan).hexdigest()
        st.object_path(sha).parent.mkdir(exist_ok=True)
        st.object_path(sha).write_bytes(orphan)
        assert st.counts()["instances"] == 1  # neither has a row
        assert [o["sha256"] for o in st.check(repair=False)["orphans"]] == [sha]
        with StudyStore(root) as second:  # another store is open: a live writer's files are left alone
            assert (root / "tmp" / "4242-deadbeef.part").exists()
            assert second.counts()["instances"] == 1
    with StudyStore(root) as st:  # the only one open: sweeps the temp file, re-links the whole file
        assert list((root / "tmp").iterdir()) == []
        assert st.counts()["instances"] == 2
        assert st.get_study(dicom_samples[2].study_uid)["instance_count"] == 1
        assert dicom_samples[1].study_uid not in {s["study_uid"] for s in st.list_studies()["studies"]}
        rep = st.check()
        assert rep["ok"] and rep["relinked"] == [] and rep["instances"] == 2


def test_check_relinks_orphans_and_drops_stale_copies(study_store, dicom_samples):
    import pydicom

    ct = study_store.add_file(dicom_samples[0].path)
    orphan = dicom_samples[1].path.read_bytes()
    ds = pydicom.dcmread(dicom_samples[0].path)
    ds.StudyDescription = "another copy of the same instance"
    stale = _bytes(ds)
    for blob in (orphan, stale):
        p = study_store.object_path(hashlib.sha256(blob).hexdigest())
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(blob)
    rep = study_store.check()
    assert rep["ok"] and len(rep["relinked"]) == 1 and len(rep["removed"]) == 1
    assert rep["relinked"][0]["sop_instance_uid"] == dicom_samples[1].sop_instance_uid
    assert {p.stem for p in _objects(study_store.root)} == {ct.sha256, rep["relinked"][0]["sha256"]}
    info = study_store.instance_info(dicom_samples[1].study_uid, dicom_samples[1].sop_instance_uid)
    assert info["sha256"] == hashlib.sha256(orphan).hexdigest()


def test_check_finds_missing_and_damaged_files(study_store, dicom_samples):
    a, b, c = (study_store.add_file(s.path) for s in dicom_samples[:3])
    study_store.object_path(a.sha256).unlink()
    with open(study_store.object_path(b.sha256), "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xff")
    rep = study_store.check(repair=False)
    assert not rep["ok"]
    assert [m["sop_instance_uid"] for m in rep["missing"]] == [a.sop_instance_uid]
    assert [m["sop_instance_uid"] for m in rep["mismatched"]] == [b.sop_instance_uid]
    assert study_store.check(verify=False, repair=False)["mismatched"] == []  # same size: only a hash sees it
    with pytest.raises(InputError, match="missing"):
        study_store.instance_path(a.study_uid, a.sop_instance_uid)
    fixed = study_store.check()
    assert fixed["ok"] and fixed["instances"] == 1
    assert (study_store.root / "damaged" / f"{b.sha256}.dcm").is_file()  # kept aside, never deleted
    assert study_store.list_studies()["total"] == 1
    assert study_store.add_file(dicom_samples[0].path).status == "stored"  # the sender's next push heals it


@contextlib.contextmanager
def _small_disk(path: Path, size: str = "2m"):
    """A small tmpfs at ``path`` (root), else None (the ENOSPC is then simulated)."""
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    try:
        yield r.returncode == 0
    finally:
        if r.returncode == 0 and subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(disk: Path) -> Path:
    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        chunk = 1 << 20
        while chunk >= 512:
            try:
                f.write(b"\0" * chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    return ballast


class _NoSpaceOS:
    """The store module's ``os`` with a write that fails like a full disk (where tmpfs can't be mounted)."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def write(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """``(data_dir, fill, free)``: ``fill()`` makes the data dir's disk full, ``free()`` undoes it."""
    with _small_disk(tmp_path / "disk") as mounted:
        disk = tmp_path / "disk"
        ballast = []

        def fill():
            if mounted:
                ballast.append(fill_disk(disk))
            else:
                monkeypatch.setattr(store_mod, "os", _NoSpaceOS())

        def free():
            if mounted:
                ballast.pop().unlink()
            else:
                monkeypatch.setattr(store_mod, "os", os)

        yield disk / "data", fill, free


def test_full_disk_is_a_resource_error_with_nothing_half_written(full_disk, dicom_samples):
    data, fill, free = full_disk
    with StudyStore(data / "studies") as st:
        st.add_file(dicom_samples[0].path)
        fill()
        with pytest.raises(ResourceError, match="no space left"):
            st.add_file(dicom_samples[3].path)  # the 225 KB multi-frame
        assert len(_objects(st.root)) == 1 and list((st.root / "tmp").iterdir()) == []
        assert st.counts()["instances"] == 1
        free()
        assert st.add_file(dicom_samples[3].path).status == "stored"
        assert st.check()["ok"] and st.counts()["instances"] == 2


def test_threads_adding_at_once_lose_nothing(study_store, tmp_path):
    blobs = [_bytes(ds) for ds in ct_instances(48, series=3, seed=2)]
    results, errors = [], []

    def work(k):
        try:
            for i in range(k, len(blobs), 6):  # each instance twice, by two different threads
                results.append(study_store.add_bytes(blobs[i]).status)
                results.append(study_store.add_bytes(blobs[(i + 1) % len(blobs)]).status)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results.count("stored") == 48 and results.count("duplicate") == 48
    assert study_store.counts()["instances"] == 48 and len(_objects(study_store.root)) == 48
    st = study_store.get_study(study_store.list_studies()["studies"][0]["study_uid"])
    assert [len(s["instances"]) for s in st["series"]] == [16, 16, 16]
    assert study_store.check()["ok"]


def test_logs_carry_hashes_not_patient_data(study_store, dicom_samples, caplog):
    ct = dicom_samples[0]
    with caplog.at_level(logging.DEBUG):
        study_store.add_file(ct.path)
        study_store.add_file(ct.path)
        study_store.import_folder(ct.path.parent / "dicomdirtests")
    text = caplog.text
    assert uid_hash(ct.sop_instance_uid) in text
    for secret in ("CompressedSamples", "1CT1", ct.sop_instance_uid, ct.study_uid, "Doe^Peter", "Doe"):
        assert secret not in text


def test_damaged_catalogue_is_reported_with_the_recovery(dicom_data, dicom_samples):
    root = dicom_data / "studies"
    with StudyStore(root) as st:
        st.add_file(dicom_samples[0].path)
    (root / "catalogue.sqlite").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            (root / f"catalogue.sqlite{suffix}").unlink()
    with pytest.raises(InputError, match="damaged.*dicom check"):
        StudyStore(root)
    (root / "catalogue.sqlite").rename(root / "catalogue.sqlite.damaged")  # the recovery: move it aside,
    with StudyStore(root) as st:  # and the next open rebuilds the catalogue from the files
        assert st.check()["ok"] and st.counts()["instances"] == 1
        assert st.get_study(dicom_samples[0].study_uid)["series"][0]["instances"][0]["displayable"]
