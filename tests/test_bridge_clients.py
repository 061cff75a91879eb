"""The Java client and the Kotlin wrapper, compiled here and run against a real server."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from android_bridge.transcripts import FIXTURES

BRIDGE = Path(__file__).resolve().parent.parent / "android_bridge"
ORG_JSON = Path("/usr/share/java/com.android.json.jar")  # Debian: libandroid-json-java
KOTLIN_STDLIB = Path("/usr/share/java/kotlin-stdlib.jar")  # Debian: kotlin
TRANSCRIPTS = [
    "health.jsonl",
    "generate.jsonl",
    "generate_image.jsonl",
    "errors.jsonl",
    "medsiglip.jsonl",
    "clinic.jsonl",
    "load_unload.jsonl",
]


def _need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, (
        f"{tool} not found: run scripts/system-packages.sh (default-jdk, kotlin, libandroid-json-java)"
    )
    return path


@pytest.fixture(scope="session")
def jvm_classes(tmp_path_factory) -> dict[str, Path]:
    """Compile the Java sources (--release 8: the Android-compatible API) and the Kotlin ones, once."""
    assert ORG_JSON.is_file(), f"{ORG_JSON} missing: apt-get install libandroid-json-java"
    out = tmp_path_factory.mktemp("jvm")
    java_out, kt_out = out / "java", out / "kotlin"
    sources = sorted(str(p) for p in (BRIDGE / "java").rglob("*.java"))
    subprocess.run(
        [
            _need("javac"),
            "--release",
            "8",
            "-Werror",
            "-Xlint:all,-options",
            "-cp",
            str(ORG_JSON),
            "-d",
            str(java_out),
            *sources,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    kt_sources = sorted(str(p) for p in (BRIDGE / "kotlin").rglob("*.kt"))
    subprocess.run(
        [_need("kotlinc"), "-cp", f"{ORG_JSON}:{java_out}", "-d", str(kt_out), *kt_sources],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return {"java": java_out, "kotlin": kt_out}


def _run(classpath: list[Path], main: str, *args: str) -> str:
    proc = subprocess.run(
        [_need("java"), "-cp", ":".join(map(str, classpath)), main, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_java_client_replays_the_transcripts(jvm_classes, twin_transports):
    ep = twin_transports.server.endpoint_file
    out = _run([jvm_classes["java"], ORG_JSON], "TranscriptTest", str(ep), str(FIXTURES), *TRANSCRIPTS)
    assert out.count("ok transcript") == len(TRANSCRIPTS)
    assert "ok streaming callbacks and cancel" in out and "ok wrong token -> 401" in out


def test_kotlin_wrapper_replays_the_transcripts(jvm_classes, twin_transports):
    ep = twin_transports.server.endpoint_file
    out = _run(
        [jvm_classes["kotlin"], jvm_classes["java"], ORG_JSON, KOTLIN_STDLIB],
        "TranscriptTestKtKt",
        str(ep),
        str(FIXTURES),
        str(FIXTURES / "image.png"),
        *TRANSCRIPTS,
    )
    assert out.count("ok transcript") == len(TRANSCRIPTS) and "ok kotlin" in out
