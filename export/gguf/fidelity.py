"""Fidelity of exported GGUFs: llama.cpp against transformers on the same tokens and image.

For each text GGUF (the unquantized conversion and every quantization):

* text prompts: the same token ids (transformers' tokenizer) through both; per position, top-1
  agreement, max and mean absolute logit difference, and KL(transformers || llama.cpp);
* one text+image prompt: the image through libmtmd (``mtmd_helper_eval_chunks``) and through
  ``Gemma3ForConditionalGeneration`` with ``pixel_values``; the last position's logits compared.

For each mmproj: the image embeddings libmtmd produces (``mtmd_encode_chunk`` +
``mtmd_get_output_embd``) against transformers' ``get_image_features`` (vision tower +
projector): cosine (whole and worst token) and max absolute difference.

The test image is drawn at the model's input size so neither side resamples it: both then only
rescale and normalise, and the comparison measures the model, not two resizers.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge.errors import EdgeError, require

log = logging.getLogger(__name__)

TEXT_PROMPTS = [
    "The chest x-ray shows a small pleural effusion in the right lower lobe.",
    "Impression: moderate consolidation; no pneumothorax. Follow-up in 6 weeks.",
    "<start_of_turn>user\nWhich abnormality is visible in the radiograph?<end_of_turn>\n<start_of_turn>model\n",
    "Findings: nodule at the left upper lobe measuring 12 mm, compared with prior study.",
]
IMAGE_QUESTION = "Describe the findings in this image."
# llama.cpp runs the comparison with an f32 KV cache so the table measures the file, not the
# runtime's f16 cache (which adds ~2e-3 on the tiny twin). Even so an f32 GGUF differs from
# transformers by a few 1e-3 in absolute logits on the tiny twin: ggml's CPU GELU looks its
# input up in an f16 table (rounding the reference's GELU through f16 removes most of it).
KV_F32 = {"type_k": 0, "type_v": 0}  # GGML_TYPE_F32


def test_image(size: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB image (H, W, 3) uint8: smooth gradients plus noise, at ``size`` px."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    base = np.stack([x, y, (x + y) / 2], axis=-1) * 200
    return np.clip(base + rng.rand(size, size, 3) * 55, 0, 255).astype(np.uint8)


# --- comparisons ---------------------------------------------------------------------------------


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict:
    """ref, got: [T, V] logits over the same positions and vocabulary."""
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    lp, lq = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    diff = np.abs(ref - got)
    return {
        "positions": int(ref.shape[0]),
        "top1": float((ref.argmax(-1) == got.argmax(-1)).mean()),
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "kl": float(kl.mean()),
    }


def compare_embeddings(ref: np.ndarray, got: np.ndarray) -> dict:
    """ref, got: [n_tokens, n_embd] image embeddings."""
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    per = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    whole = float((ref * got).sum() / (np.linalg.norm(ref) * np.linalg.norm(got)))
    return {
        "tokens": int(ref.shape[0]),
        "cosine": whole,
        "cosine_min_token": float(per.min()),
        "max_abs": float(np.abs(ref - got).max()),
    }


# --- transformers (the reference) -----------------------------------------------------------------


class Reference:
    """transformers' Gemma3ForConditionalGeneration in float32 on the checkpoint, with its outputs
    for the fixed prompts and image."""

    def __init__(self, src: Path):
        torch = require("torch", "export")
        transformers = require("transformers", "export")
        self.model = transformers.Gemma3ForConditionalGeneration.from_pretrained(
            src, dtype=torch.float32
        ).eval()
        self.processor = transformers.AutoProcessor.from_pretrained(src, use_fast=False)
        self.tok = self.processor.tokenizer
        cfg = self.model.config
        self.image_size = int(cfg.vision_config.image_size)
        self.image = test_image(self.image_size)
        with torch.no_grad():
            self.text_ids = [self.tok(p, add_special_tokens=True)["input_ids"] for p in TEXT_PROMPTS]
            self.text_logits = [
                self.model(input_ids=torch.tensor([ids])).logits[0].numpy() for ids in self.text_ids
            ]
            msgs = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": IMAGE_QUESTION}]}
            ]
            self.image_prompt = self.processor.apply_chat_template(msgs, add_generation_prompt=True)
            from PIL import Image

            batch = self.processor(
                text=self.image_prompt,
                images=Image.fromarray(self.image),
                add_special_tokens=False,  # the template already starts with <bos>
                return_tensors="pt",
            )
            self.image_ids = batch["input_ids"][0].tolist()
            self.image_token = int(cfg.image_token_index)
            self.image_logits = self.model(**batch).logits[0, -1].numpy()
            feats = self.model.get_image_features(pixel_values=batch["pixel_values"])
            self.image_embd = feats[0].numpy() if feats.dim() == 3 else feats.numpy()


# --- llama.cpp ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_llama():
    """Silence llama.cpp's C-side log (it prints through the binding's logger) unless debugging."""
    import llama_cpp._logger as lg
    from llama_cpp._utils import suppress_stdout_stderr

    old = lg.logger.level
    debug = log.isEnabledFor(logging.DEBUG)
    if not debug:
        lg.logger.setLevel(logging.ERROR)
    try:
        with suppress_stdout_stderr(disable=debug):  # libmtmd logs straight to stderr
            yield
    finally:
        lg.logger.setLevel(old)


def llama_text_logits(
    path: Path, prompts: list[list[int]], *, threads: int | None = None
) -> list[np.ndarray]:
    """llama.cpp's logits [T, V] for every position of each token list."""
    from edge.medgemma.llama_binding import load_llama

    n_ctx = max(64, max(len(p) for p in prompts) + 8)
    with quiet_llama():
        llm = load_llama(  # llama-cpp-python's defaults, as this CPU can take them (no AMX repack)
            path,
            repack=True,
            n_ctx=n_ctx,
            logits_all=True,
            n_threads=threads,
            verbose=False,
            seed=0,
            **KV_F32,
        )
    out = []
    try:
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        with quiet_llama():
            llm.close()
    return out


def llama_image(
    text_path: Path, mmproj_path: Path, *, prompt: str, image: np.ndarray, threads: int | None = None
) -> dict:
    """Run ``prompt`` (containing the Gemma 3 ``<start_of_image>`` once) with ``image`` through
    libmtmd: returns the image embeddings, the last position's logits and the text tokens."""
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    from edge.medgemma.llama_binding import load_llama

    text = prompt.removeprefix("<bos>")
    marker = mtmd.mtmd_default_marker().decode()
    # the Gemma 3 processor expands <start_of_image> to "\n\n<start_of_image>…<end_of_image>\n\n";
    # libmtmd adds <start_of_image>/<end_of_image> around the marker itself
    text = text.replace("<start_of_image>", f"\n\n{marker}\n\n", 1)
    with quiet_llama():
        llm = load_llama(
            text_path,
            repack=True,
            n_ctx=512,
            n_batch=512,
            n_threads=threads,
            verbose=False,
            seed=0,
            **KV_F32,
        )
    ctx = bitmap = chunks = None
    try:
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = threads or llm.n_threads
        params.warmup = False
        with quiet_llama():
            ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), llm.model, params)
        if not ctx:
            raise EdgeError(f"libmtmd could not load {mmproj_path.name} with {text_path.name}")
        h, w, _ = image.shape
        data = np.ascontiguousarray(image).tobytes()
        bitmap = mtmd.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * len(data)).from_buffer_copy(data))
        chunks = mtmd.mtmd_input_chunks_init()
        inp = mtmd.mtmd_input_text(
            text=text.encode(), text_len=len(text.encode()), add_special=True, parse_special=True
        )
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        with quiet_llama():
            rc = mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), bitmaps, 1)
        if rc != 0:
            raise EdgeError("libmtmd could not tokenize the image prompt")
        tokens: list[int] = []
        embd = None
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                tokens += [ptr[j] for j in range(n.value)]
            else:
                n_tok = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                with quiet_llama():
                    rc = mtmd.mtmd_encode_chunk(ctx, chunk)
                if rc != 0:
                    raise EdgeError("libmtmd could not encode the image")
                out = mtmd.mtmd_get_output_embd(ctx)
                n_embd = llama_cpp.llama_model_n_embd(llm.model)
                embd = np.ctypeslib.as_array(out, shape=(n_tok * n_embd,)).reshape(n_tok, n_embd).copy()
                tokens += [-1] * n_tok
        new_n_past = llama_cpp.llama_pos(0)
        with quiet_llama():
            rc = mtmd.mtmd_helper_eval_chunks(ctx, llm.ctx, chunks, 0, 0, 512, True, ctypes.byref(new_n_past))
        if rc != 0:
            raise EdgeError(f"libmtmd could not evaluate the image prompt (code {rc})")
        n_vocab = llm.n_vocab()
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()
        return {"embd": embd, "logits": logits, "tokens": tokens}
    finally:
        with quiet_llama():
            if chunks:
                mtmd.mtmd_input_chunks_free(chunks)
            if bitmap:
                mtmd.mtmd_bitmap_free(bitmap)
            if ctx:
                mtmd.mtmd_free(ctx)
            llm.close()


# --- the table -----------------------------------------------------------------------------------------


def measure(
    src: Path,
    *,
    texts: dict[str, Path],
    mmprojs: dict[str, Path],
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """The fidelity table for ``texts`` (quant → text GGUF) and ``mmprojs`` (type → mmproj GGUF)."""
    import transformers

    total = 1 + len(texts) + len(mmprojs)
    ref = Reference(Path(src))
    if progress:
        progress(1, total)
    table: dict = {
        "reference": f"transformers {transformers.__version__} Gemma3ForConditionalGeneration, float32",
        "prompts": {"text": len(TEXT_PROMPTS), "text_tokens": sum(len(i) for i in ref.text_ids), "image": 1},
        "llama_cpp": {"kv_cache": "f32", "flash_attn": "default"},
        "image": {
            "size": ref.image_size,
            "note": "test image drawn at the model's input size: neither side resamples it",
        },
        "text": {},
        "mmproj": {},
    }
    # the mmproj used for every text file's image prompt: the most precise one written
    mm_for_text = next((mmprojs[t] for t in ("f32", "f16", "q8_0") if t in mmprojs), None)
    done = 1
    for quant, path in texts.items():
        got = llama_text_logits(path, ref.text_ids, threads=threads)
        v = min(got[0].shape[-1], ref.text_logits[0].shape[-1])  # HF pads vocab rows the GGUF drops
        row = compare_logits(
            np.concatenate([r[:, :v] for r in ref.text_logits]), np.concatenate([g[:, :v] for g in got])
        )
        if mm_for_text is not None:
            img = llama_image(path, mm_for_text, prompt=ref.image_prompt, image=ref.image, threads=threads)
            want = [t if t != ref.image_token else -1 for t in ref.image_ids]
            last = compare_logits(ref.image_logits[None, :v], img["logits"][None, :v])
            row["image_prompt"] = {
                "mmproj": mm_for_text.name.removeprefix("mmproj-").removesuffix(".gguf"),
                "tokens_match": img["tokens"] == want,
                "top1": last["top1"],
                "max_abs": last["max_abs"],
                "kl": last["kl"],
            }
        table["text"][quant] = row
        log.info("fidelity %s: %s", quant, row)
        done += 1
        if progress:
            progress(done, total)
    first_text = next(iter(texts.values()))
    for mtype, path in mmprojs.items():
        img = llama_image(first_text, path, prompt=ref.image_prompt, image=ref.image, threads=threads)
        table["mmproj"][mtype] = compare_embeddings(ref.image_embd, img["embd"])
        log.info("fidelity mmproj %s: %s", mtype, table["mmproj"][mtype])
        done += 1
        if progress:
            progress(done, total)
    return table
