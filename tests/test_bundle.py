import json
import os

import pytest

from edge.bundle import manifest
from edge.bundle.write import BundleWriter
from edge.errors import InputError, IntegrityError, UsageError


def _write(root, component="medgemma", payload=b"x" * 1000, name="a.bin", fail=False):
    with BundleWriter(root, component) as w:
        w.path(f"{component}/{name}").write_bytes(payload)
        w.add_file(f"{component}/{name}", role="test")
        w.component.update(source={"description": "unit test", "synthetic": True})
        if fail:
            raise KeyboardInterrupt
    return manifest.open_bundle(root)


def test_write_and_verify(tmp_path):
    b = _write(tmp_path / "B")
    rep = b.verify()
    assert rep.ok and rep.files[0].hashed
    assert b.manifest["format"] == manifest.FORMAT
    assert (tmp_path / "B" / "NOTICE").read_text().startswith("This bundle was made by medgemma-edge")
    # a second verify trusts the stamp (same size and mtime) and does not re-hash
    assert not b.verify().files[0].hashed
    assert b.verify(trust_stamp=False).files[0].hashed


def test_tamper_is_caught_and_named(tmp_path):
    b = _write(tmp_path / "B")
    b.verify()
    p = tmp_path / "B" / "medgemma" / "a.bin"
    data = bytearray(p.read_bytes())
    data[10] ^= 1
    p.write_bytes(bytes(data))
    rep = b.verify()
    assert not rep.ok and "sha256" in rep.files[0].error
    with pytest.raises(IntegrityError, match="medgemma/a.bin"):
        rep.raise_for_failure()


def test_truncation_and_missing(tmp_path):
    b = _write(tmp_path / "B")
    p = tmp_path / "B" / "medgemma" / "a.bin"
    p.write_bytes(b"x" * 10)
    assert "truncated" in b.verify().files[0].error
    p.unlink()
    assert b.verify().files[0].error == "missing"


def test_interrupted_write_keeps_previous_bundle(tmp_path):
    root = tmp_path / "B"
    _write(root, payload=b"old")
    with pytest.raises(KeyboardInterrupt):
        _write(root, payload=b"new", fail=True)
    b = manifest.open_bundle(root)
    assert (root / "medgemma" / "a.bin").read_bytes() == b"old" and b.verify().ok
    assert sorted(p.name for p in tmp_path.iterdir()) == [".B.lock", "B"]  # no staging left


def test_second_component_keeps_first(tmp_path):
    root = tmp_path / "B"
    _write(root, "medgemma", b"gguf")
    b = _write(root, "medsiglip", b"onnx", name="v.onnx.bin")
    assert set(b.components) == {"medgemma", "medsiglip"} and b.verify().ok
    b = _write(root, "medgemma", b"gguf2")
    assert (root / "medsiglip" / "v.onnx.bin").read_bytes() == b"onnx" and b.verify().ok
    assert b.fingerprint("medsiglip") == manifest.open_bundle(root).fingerprint("medsiglip")


def test_recovers_from_crash_between_renames(tmp_path):
    root = tmp_path / "B"
    _write(root)
    os.rename(root, tmp_path / ".B.previous-1-abcd")  # as if killed between the two renames
    assert manifest.open_bundle(root).verify().ok


def test_bad_manifests(tmp_path):
    root = tmp_path / "B"
    root.mkdir()
    with pytest.raises(InputError, match="no manifest.json"):
        manifest.open_bundle(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        manifest.open_bundle(root)
    (root / "manifest.json").write_text(json.dumps({"format": "other/9", "components": {}}))
    with pytest.raises(InputError, match="can't read it"):
        manifest.open_bundle(root)
    (root / "manifest.json").write_text(
        json.dumps(
            {"format": manifest.FORMAT, "components": {"medgemma": {"files": [{"path": "../../etc/passwd"}]}}}
        )
    )
    with pytest.raises(InputError, match="unsafe path"):
        manifest.open_bundle(root)


def test_refuses_non_bundle_directory(tmp_path):
    root = tmp_path / "B"
    root.mkdir()
    (root / "precious.txt").write_text("x")
    with pytest.raises(UsageError, match="not a bundle"):
        _write(root)


def test_update_adds_to_a_component(tmp_path):
    root = tmp_path / "B"
    _write(root, "medgemma", b"text")
    with BundleWriter(root, "medgemma", update=True) as w:
        w.path("medgemma/extra.bin").write_bytes(b"extra")
        w.add_file("medgemma/extra.bin", role="extra")
        w.component["note"] = "added"
    b = manifest.open_bundle(root)
    comp = b.component("medgemma")
    assert [f["path"] for f in comp["files"]] == ["medgemma/a.bin", "medgemma/extra.bin"]
    assert comp["source"]["description"] == "unit test" and comp["note"] == "added"
    assert b.verify().ok
