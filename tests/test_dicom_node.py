"""The DICOM node (android_bridge/dicom_node.py) against real peers: dcmtk's echoscu/storescu and a
pynetdicom SCU; allow-lists, duplicates, 200 instances on 4 associations, a full disk (0xA700), a
SIGKILL mid-transfer, and the ``medgemma-edge dicom`` verbs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from fixtures_dicom import big_dx, ct_instances, echoscu, sample_dir, storescu
from test_studies import _small_disk, fill_disk

from android_bridge.dicom_node import DicomNode
from edge.errors import UsageError
from edge.studies.instance import read_facts
from edge.studies.store import StudyStore, uid_hash

pytest_plugins = ["fixtures_dicom"]


def _scu(port: int, datasets, *, aet: str = "LOADER", syntax=None) -> list[int]:
    """Send ``datasets`` on one pynetdicom association; their C-STORE statuses."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    classes = {str(ds.SOPClassUID) for ds in datasets}
    for c in classes:
        ae.add_requested_context(c, syntax or ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDGEMMA")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_echoscu_succeeds(dicom_node):
    node = dicom_node()
    assert node.port > 0
    r = echoscu(node.port)
    assert r.returncode == 0, r.stderr


def test_storescu_pushes_the_samples_and_a_second_push_adds_nothing(dicom_node, study_store, dicom_samples):
    stored = []
    node = dicom_node(on_stored=stored.append)
    for r in storescu(node.port, *(s.path for s in dicom_samples), aet="CR01"):
        assert r.returncode == 0, r.stderr
    page = study_store.list_studies()
    assert page["total"] == len(dicom_samples)
    assert {s["study_uid"] for s in page["studies"]} == {s.study_uid for s in dicom_samples}
    for s in dicom_samples:
        st = study_store.get_study(s.study_uid)
        assert st["calling_ae"] == "CR01"
        (series,) = st["series"]
        (inst,) = series["instances"]
        assert (series["series_uid"], inst["sop_instance_uid"]) == (s.series_uid, s.sop_instance_uid)
        assert inst["transfer_syntax"] == s.transfer_syntax and inst["frames"] == s.frames
        assert abs(inst["bytes"] - s.path.stat().st_size) < 1024  # the data set as sent, under our file meta
        if s.kind == "compressed":
            assert not inst["displayable"] and "1.2.840.10008.1.2.4.70" in inst["why_not"]
        else:
            assert inst["displayable"], (s.kind, inst["why_not"])
    assert sorted(x.sop_instance_uid for x in stored) == sorted(s.sop_instance_uid for s in dicom_samples)
    before = study_store.counts()
    for r in storescu(node.port, *(s.path for s in dicom_samples), aet="CR01"):
        assert r.returncode == 0, r.stderr
    assert study_store.counts() == before and len(stored) == len(dicom_samples)  # on_stored: new ones only
    assert node.stats["duplicates"] == len(dicom_samples)
    assert study_store.check()["ok"]


def test_calling_ae_not_on_the_allow_list_is_rejected_at_association(dicom_node, study_store, dicom_samples):
    node = dicom_node(allowed_aes=("CR01", "CT-ROOM-2"))
    r = echoscu(node.port, aet="INTRUDER")
    assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.stderr
    (r,) = storescu(node.port, dicom_samples[0].path, aet="INTRUDER")
    assert r.returncode != 0 and "Association Rejected" in r.stderr
    assert study_store.counts()["instances"] == 0
    assert echoscu(node.port, aet="CT-ROOM-2").returncode == 0
    (r,) = storescu(node.port, dicom_samples[0].path, aet="CR01")
    assert r.returncode == 0 and study_store.counts()["instances"] == 1
    assert node.stats["rejected"] == 2


def test_peer_not_on_the_ip_allow_list_is_refused(dicom_node, study_store, dicom_samples):
    node = dicom_node(allowed_peers=("192.168.7.0/24", "10.1.2.3"))
    r = echoscu(node.port)
    assert r.returncode != 0 and "Association Rejected" in r.stderr
    (r,) = storescu(node.port, dicom_samples[0].path)
    assert r.returncode != 0 and study_store.counts()["instances"] == 0
    ok = dicom_node(allowed_peers=("127.0.0.0/8",))
    assert echoscu(ok.port).returncode == 0


def test_bad_node_settings_are_usage_errors(study_store):
    for kwargs in (
        {"ae_title": "A" * 17},
        {"ae_title": ""},
        {"allowed_aes": ("BAD\\AE",)},
        {"allowed_peers": ("not-an-ip",)},
        {"port": 70000},
    ):
        with pytest.raises(UsageError):
            DicomNode(study_store, **kwargs)
    busy = DicomNode(study_store, port=0)
    busy.start()
    try:
        with pytest.raises(UsageError, match="can't listen"):
            DicomNode(study_store, port=busy.port).start()
    finally:
        busy.stop()


def test_200_instances_on_4_associations_at_once(dicom_node, study_store):
    node = dicom_node()
    datasets = ct_instances(200, series=4, seed=11)
    statuses: list[int] = []
    errors: list[BaseException] = []

    def send(chunk):
        try:
            statuses.extend(_scu(node.port, chunk))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(datasets[k::4],)) for k in range(4)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.perf_counter() - t0
    assert not errors and statuses == [0] * 200, (errors, set(statuses))
    st = study_store.get_study(datasets[0].StudyInstanceUID)
    assert st["instance_count"] == 200 and st["series_count"] == 4
    uids = [i["sop_instance_uid"] for s in st["series"] for i in s["instances"]]
    assert sorted(uids) == sorted(str(ds.SOPInstanceUID) for ds in datasets)  # none lost, none twice
    assert study_store.counts()["instances"] == 200
    assert len(list((study_store.root / "objects").rglob("*.dcm"))) == 200
    rep = study_store.check()
    assert rep["ok"] and rep["instances"] == 200 and not rep["relinked"]
    assert node.stats["stored"] == 200 and node.stats["associations"] == 4
    print(f"200 instances on 4 associations: {elapsed:.1f} s, {200 / elapsed:.0f} instances/s")


def test_full_disk_answers_out_of_resources_and_leaves_nothing(tmp_path, dicom_samples):
    with _small_disk(tmp_path / "disk") as mounted:
        if not mounted:
            pytest.skip("needs root to mount a small tmpfs; tests/test_studies.py covers ENOSPC without it")
        with StudyStore(tmp_path / "disk" / "studies") as store:
            node = DicomNode(store, port=0)
            node.start()
            try:
                import pydicom

                ds = pydicom.dcmread(dicom_samples[3].path)  # 225 KB multi-frame
                ballast = fill_disk(tmp_path / "disk")
                from pydicom.uid import JPEGBaseline8Bit

                assert _scu(node.port, [ds], syntax=JPEGBaseline8Bit) == [0xA700]
                assert store.counts()["instances"] == 0
                assert not list((store.root / "objects").rglob("*.dcm")) and not list(
                    (store.root / "tmp").iterdir()
                )
                ballast.unlink()  # the modality retries once there is room
                assert _scu(node.port, [ds], syntax=JPEGBaseline8Bit) == [0]
                assert store.counts()["instances"] == 1 and store.check()["ok"]
            finally:
                node.stop()


def test_undecodable_data_set_gets_a_cannot_understand_failure(dicom_node, study_store, tmp_path):
    import pydicom

    node = dicom_node()
    ds = pydicom.dcmread(sample_dir() / "CT_small.dcm")
    del ds.StudyInstanceUID, ds.SeriesInstanceUID
    (status,) = _scu(node.port, [ds])
    assert 0xC000 <= status <= 0xCFFF
    assert study_store.counts()["instances"] == 0 and node.stats["failed"] == 1


def test_logs_carry_hashes_not_patient_data_or_uids(dicom_node, dicom_samples, caplog):
    ct = dicom_samples[0]
    with caplog.at_level(logging.DEBUG):
        node = dicom_node()
        (r,) = storescu(node.port, ct.path)
        assert r.returncode == 0
        node.stop()
    text = caplog.text
    assert uid_hash(ct.sop_instance_uid) in text and "association #1" in text
    for secret in ("CompressedSamples", "1CT1", ct.sop_instance_uid, ct.study_uid, ct.series_uid):
        assert secret not in text


def test_lan_bind_is_logged_and_stop_frees_the_port(study_store, caplog):
    with caplog.at_level(logging.INFO, logger="android_bridge.dicom_node"):
        node = DicomNode(study_store, host="0.0.0.0", port=0)
        node.start()
        port = node.port
        node.stop()
        node.stop()  # idempotent
    assert any("LAN bind" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    again = DicomNode(study_store, port=port)
    again.start()  # the port is free again
    again.stop()


def test_stop_aborts_an_idle_association_after_the_grace_time(study_store):
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    node = DicomNode(study_store, port=0)
    node.start()
    ae = AE(ae_title="IDLER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MEDGEMMA")
    assert assoc.is_established
    t0 = time.monotonic()
    node.stop(grace_s=0.5)  # the modality keeps its association open: stop must not hang on it
    assert time.monotonic() - t0 < 5
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted and not node.running


# --- SIGKILL mid-transfer (the node in its own process) ---------------------------------------------

# The child: the real CLI (`dicom listen`); the only thing this script adds is a pause inside the
# store for instances over 10 MB, after half of the bytes are written ("write") or after the file
# is in place but before the catalogue commit ("commit"), writing MARKER first.
CHILD = r"""
import os, sys, time
mode, marker, *argv = sys.argv[1:]

def pause():
    open(marker, "w").close()
    time.sleep(600)

if mode == "write":
    real_write = os.write
    def write(fd, data):
        if len(data) > 10_000_000:
            real_write(fd, bytes(data[: len(data) // 2]))
            os.fsync(fd)
            pause()
        return real_write(fd, data)
    os.write = write
else:
    from edge.studies.store import StudyStore
    real_insert = StudyStore._insert
    def insert(self, facts, sha, size, **kw):
        if size > 10_000_000:
            pause()
        return real_insert(self, facts, sha, size, **kw)
    StudyStore._insert = insert

from medgemma_edge.cli import main
raise SystemExit(main(argv))
"""


def _listen(data: Path, *argv: str, mode: str | None = None, marker: Path | None = None) -> tuple:
    """Start ``dicom listen --port 0`` (with CHILD's pause when ``mode``); (Popen, port)."""
    args = ["dicom", "listen", "--data", str(data), "--port", "0", *argv]
    cmd = (
        [sys.executable, "-c", CHILD, mode, str(marker), *args]
        if mode
        else [sys.executable, "-m", "medgemma_edge", *args]
    )
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening on 127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, int(line.split("listening on 127.0.0.1:")[1].split(",")[0])


@pytest.mark.parametrize("mode", ["write", "commit"])
def test_sigkill_mid_transfer_leaves_no_entry_and_the_retry_stores_it(tmp_path, mode):
    data = tmp_path / "data"
    dx = big_dx(tmp_path / "dx.dcm", mb=20)
    marker = tmp_path / "paused"
    node, port = _listen(data, mode=mode, marker=marker)
    sender = subprocess.Popen(
        ["storescu", "-aec", "MEDGEMMA", "-to", "20", "127.0.0.1", str(port), str(dx)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert time.monotonic() < deadline and node.poll() is None, (
                node.stderr.read() if node.poll() else "timeout"
            )
            time.sleep(0.05)
        node.send_signal(signal.SIGKILL)
        node.wait(10)
        assert sender.wait(30) != 0  # the modality saw the failure: it keeps the instance and retries
    finally:
        for p in (node, sender):
            if p.poll() is None:
                p.kill()
                p.wait()
    import pydicom

    sop = str(pydicom.dcmread(dx, stop_before_pixels=True).SOPInstanceUID)
    root = data / "studies"
    objects = list((root / "objects").rglob("*.dcm"))
    if mode == "write":  # torn: only a temp file, no object, no row
        assert len(list((root / "tmp").iterdir())) == 1 and objects == []
    else:  # the file was in place, whole, when the kill came before its row committed
        (f,) = objects
        assert hashlib.sha256(f.read_bytes()).hexdigest() == f.stem
        assert read_facts(f.read_bytes()).displayable  # all of its pixel data is there
    db = sqlite3.connect(root / "catalogue.sqlite")  # what the catalogue held at the kill: no entry
    try:
        assert db.execute("SELECT COUNT(*) FROM instances WHERE sop_instance_uid = ?", (sop,)).fetchone() == (
            0,
        )
    finally:
        db.close()
    with StudyStore(root) as store:  # reopening: the temp file swept; a whole file re-linked
        assert list((root / "tmp").iterdir()) == []
        assert store.counts()["instances"] == (0 if mode == "write" else 1)
        assert list((root / "objects").rglob("*.dcm")) == objects
        assert store.check()["ok"]
    retry, port = _listen(data)
    try:
        r = subprocess.run(
            ["storescu", "-aec", "MEDGEMMA", "127.0.0.1", str(port), str(dx)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
    finally:
        retry.send_signal(signal.SIGTERM)
        out, err = retry.communicate(timeout=30)
    done = "stopped: 1 stored" if mode == "write" else "stopped: 0 stored, 1 duplicates"
    assert retry.returncode == 0 and done in out, err
    with StudyStore(root) as store:
        info = store.instance_info(store.newest()[0], sop)
        assert abs(info["bytes"] - dx.stat().st_size) < 1024 and info["displayable"]
        assert store.check()["ok"]


# --- the CLI ----------------------------------------------------------------------------------------


def test_cli_listen_answers_echoscu_and_stops_cleanly(tmp_path, dicom_samples):
    data = tmp_path / "data"
    node, port = _listen(data, "--ae-title", "EDGE1", "--allow-ae", "CR01")
    try:
        assert echoscu(port, aet="CR01", aec="EDGE1").returncode == 0
        assert echoscu(port, aet="OTHER", aec="EDGE1").returncode != 0
        (r,) = storescu(port, dicom_samples[0].path, aet="CR01", aec="EDGE1")
        assert r.returncode == 0, r.stderr
    finally:
        node.send_signal(signal.SIGTERM)
        out, err = node.communicate(timeout=30)
    assert node.returncode == 0 and "stopped: 1 stored, 0 duplicates, 0 failed, 1 associations refused" in out
    assert "Traceback" not in err
    r = run_cli("dicom", "list", "--data", str(data), "--json")
    assert r.returncode == 0, r.stderr
    page = json.loads(r.stdout)
    assert page["ok"] and page["total"] == 1 and page["studies"][0]["calling_ae"] == "CR01"


def test_cli_import_list_and_errors(tmp_path, dicom_samples, capsys):
    from medgemma_edge.cli import main

    src = tmp_path / "stick"
    (src / "nested" / "deeper").mkdir(parents=True)
    for i, s in enumerate(dicom_samples):
        (src / "nested" / ("deeper" if i % 2 else "") / f"IM{i}").write_bytes(s.path.read_bytes())
    (src / "notes.txt").write_text("not DICOM")
    data = str(tmp_path / "data")
    r = run_cli("dicom", "import", str(src), "--data", data, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert (rep["stored"], rep["duplicates"], rep["skipped"]) == (
        len(dicom_samples),
        0,
        [["notes.txt", "not a DICOM file (no DICM marker at byte 128)"]],
    )
    r = run_cli("dicom", "import", str(src), "--data", data)
    assert (
        r.returncode == 0
        and f"imported 0 instances (0.0 MiB), {len(dicom_samples)} already stored" in r.stdout
    )
    assert "skipped notes.txt" in r.stderr
    r = run_cli("dicom", "list", "--data", data, "--modality", "CT")
    assert r.returncode == 0 and "CompressedSamples^CT1" in r.stdout and "MR" not in r.stdout
    errors = {
        ("dicom", "import", str(tmp_path / "missing"), "--data", data): (3, "does not exist"),
        ("dicom", "import", str(src / "notes.txt"), "--data", data): (3, "not a folder"),
        ("dicom", "list", "--data", data, "--limit", "0"): (2, "limit must be"),
        ("dicom", "list", "--data", data, "--from", "soon"): (2, "date_from"),
        ("dicom", "listen", "--data", data, "--port", "70000"): (2, "not a port"),
        ("dicom", "listen", "--data", data, "--allow-peer", "nowhere"): (2, "not an IP address"),
        ("dicom", "bogus"): (2, "invalid choice"),
    }
    for argv, (code, needle) in errors.items():  # in this process: the same main() the console script runs
        try:
            got = main(list(argv))
        except SystemExit as exc:  # argparse's own errors
            got = exc.code
        err = capsys.readouterr().err
        assert got == code, (argv, got, err)
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) <= 4, err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["dicom", "import", str(empty), "--data", data]) == 3
    assert main(["dicom", "check", "--data", data, "--json"]) == 0
    assert os.path.isdir(Path(data) / "studies" / "objects")
