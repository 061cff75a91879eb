"""The twins' tokenizers, trained on a synthetic clinical-style corpus with SentencePiece.

A twin's tokenizer files must be ones the converters can't tell from the real ones: Gemma's
(BPE with byte fallback, fixed special ids, the turn and image tokens as control tokens) and
SigLIP's (unigram on lower-cased text). The vocabularies are small and trained from a fixed
seed, so the same seed always gives the same files.
"""

from __future__ import annotations

import random
from pathlib import Path

from edge.errors import require

GEMMA_CONTROL = [
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

_WORDS = {
    "finding": [
        "consolidation",
        "effusion",
        "pneumothorax",
        "cardiomegaly",
        "atelectasis",
        "edema",
        "nodule",
        "mass",
        "fracture",
        "opacity",
        "infiltrate",
        "lesion",
        "melanoma",
        "nevus",
        "erythema",
        "calcification",
        "emphysema",
        "fibrosis",
        "hernia",
        "pleural thickening",
    ],
    "site": [
        "right lower lobe",
        "left upper lobe",
        "lung bases",
        "mediastinum",
        "costophrenic angle",
        "hilum",
        "upper arm",
        "forearm",
        "scalp",
        "abdomen",
        "left ventricle",
        "spine",
        "pelvis",
    ],
    "modality": [
        "chest x-ray",
        "radiograph",
        "CT scan",
        "MRI",
        "dermatology photograph",
        "ultrasound",
        "fundus photograph",
        "histopathology slide",
        "mammogram",
    ],
    "verb": [
        "shows",
        "demonstrates",
        "reveals",
        "suggests",
        "is consistent with",
        "excludes",
        "raises concern for",
    ],
    "size": [
        "small",
        "moderate",
        "large",
        "subtle",
        "extensive",
        "focal",
        "diffuse",
        "bilateral",
        "3 mm",
        "12 cm",
    ],
    "q": [
        "What does this image show?",
        "Is there evidence of",
        "Describe the findings in the",
        "Which abnormality is visible in the",
        "Summarize the report for the",
    ],
}


def synthetic_corpus(seed: int, n: int = 4000) -> list[str]:
    """Deterministic clinical-style sentences: enough text to train a small vocabulary."""
    rng = random.Random(seed)
    w = _WORDS
    lines = []
    for i in range(n):
        pick = {k: rng.choice(v) for k, v in w.items()}
        form = i % 4
        if form == 0:
            s = f"The {pick['modality']} {pick['verb']} a {pick['size']} {pick['finding']} in the {pick['site']}."
        elif form == 1:
            s = f"{pick['q']} {pick['finding']} on this {pick['modality']}?"
        elif form == 2:
            s = (
                f"Impression: {pick['size']} {pick['finding']}; no {rng.choice(w['finding'])}. "
                f"Follow-up in {rng.randint(1, 12)} weeks, patient {rng.randint(18, 95)} years old."
            )
        else:
            s = (
                f"Findings: {pick['finding']} at the {pick['site']} measuring {rng.randint(1, 99)} mm, "
                f"compared with prior study from {rng.randint(2001, 2025)}-{rng.randint(1, 12):02d}."
            )
        lines.append(s)
    return lines


def _train_sentencepiece(out_prefix: Path, lines: list[str], **kw) -> Path:
    spm = require("sentencepiece", "export")
    text = out_prefix.with_suffix(".txt")
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(out_prefix),
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        input_sentence_size=len(lines),
        shuffle_input_sentence=False,
        **kw,
    )
    text.unlink()
    return out_prefix.with_suffix(".model")


def gemma_tokenizer(work: Path, seed: int, vocab: int):
    """A Gemma-style tokenizer: BPE with byte fallback, <pad>=0 <eos>=1 <bos>=2 <unk>=3,
    the turn and image tokens as control tokens, no dummy prefix."""
    transformers = require("transformers", "export")
    model = _train_sentencepiece(
        work / "gemma_sp",
        synthetic_corpus(seed),
        model_type="bpe",
        vocab_size=vocab,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        control_symbols=GEMMA_CONTROL,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
    )
    tok = transformers.GemmaTokenizerFast(
        vocab_file=str(model),
        add_bos_token=True,
        add_eos_token=False,
        additional_special_tokens=GEMMA_CONTROL,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    return tok, model


def siglip_tokenizer(work: Path, seed: int, vocab: int):
    """A SigLIP-style tokenizer: unigram SentencePiece on lower-cased text, <pad>=0 </s>=1 <unk>=2."""
    transformers = require("transformers", "export")
    lines = [s.lower() for s in synthetic_corpus(seed)]
    model = _train_sentencepiece(
        work / "spiece",
        lines,
        model_type="unigram",
        vocab_size=vocab,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
    )
    tok = transformers.SiglipTokenizer(vocab_file=str(model), model_max_length=64)
    return tok, model
