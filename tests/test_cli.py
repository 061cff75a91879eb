import json
import subprocess
import sys

from conftest import run_cli

from edge import __version__


def test_help_and_version():
    r = run_cli("--help")
    assert r.returncode == 0 and "twin" in r.stdout and "not a diagnosis" in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_no_command_is_a_usage_error():
    r = run_cli()
    assert r.returncode == 2 and "required" in r.stderr


def test_twin_unknown_model(tmp_path):
    r = run_cli("twin", "llama", "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown twin model 'llama'" in r.stderr
    assert not (tmp_path / "x").exists()


def test_twin_unknown_size(tmp_path):
    r = run_cli("twin", "medgemma", "--size", "huge", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown twin size" in r.stderr


def test_twin_refuses_non_empty_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    r = run_cli("twin", "medsiglip", "--out", str(out))
    assert r.returncode == 2 and "not empty" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_twin_unwritable_parent_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where a directory should be: can't be created, even as root
    r = run_cli("twin", "medsiglip", "--out", str(blocker / "twin"))
    assert r.returncode == 3 and "can't create" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_twin_cli_builds(tmp_path):
    r = run_cli("twin", "medsiglip", "--out", str(tmp_path / "t"), "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "synthetic twin of medsiglip-448" in r.stdout
    assert json.loads((tmp_path / "t" / "config.json").read_text())["medgemma_edge_twin"]["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no temp dirs left


def test_verify_missing_bundle_json(tmp_path):
    r = run_cli("verify", str(tmp_path / "nope"), "--json")
    assert r.returncode == 3
    obj = json.loads(r.stdout)
    assert obj["ok"] is False and "does not exist" in obj["error"]["message"]


def test_import_edge_pulls_in_no_torch_or_transformers():
    code = (
        "import sys, edge, medgemma_edge.cli, edge.bundle.manifest, edge.bundle.gguf_header, "
        "edge.bundle.registry, edge.errors, medgemma_edge.verify;"
        "medgemma_edge.cli.build_parser();"
        "bad = [m for m in ('torch', 'transformers', 'optimum', 'onnx') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
