"""Default zero-shot label sets for MedSigLIP, with prompts in the style of its model card.

The model card prompts name the image type and the finding ("a photo of an arm with a rash");
SigLIP's tokenizer lower-cases and strips punctuation, so the prompts are written plainly. The
exporter embeds every prompt with the fp32 reference text tower and stores the normalized
embeddings in ``medsiglip/label_embeddings.npz`` (one ``[labels, D]`` array per set), so
zero-shot classification against these sets needs no text tower on the device.
"""

from __future__ import annotations

LABEL_SETS: dict[str, dict[str, str]] = {
    "cxr": {
        "pleural effusion": "a chest x-ray showing pleural effusion",
        "pneumothorax": "a chest x-ray showing pneumothorax",
        "cardiomegaly": "a chest x-ray showing cardiomegaly",
        "consolidation": "a chest x-ray showing consolidation",
        "atelectasis": "a chest x-ray showing atelectasis",
        "pulmonary edema": "a chest x-ray showing pulmonary edema",
        "lung nodule": "a chest x-ray showing a lung nodule",
        "rib fracture": "a chest x-ray showing a rib fracture",
        "no acute findings": "a normal chest x-ray with no acute findings",
    },
    "derm": {
        "melanoma": "a photo of skin with melanoma",
        "basal cell carcinoma": "a photo of skin with basal cell carcinoma",
        "squamous cell carcinoma": "a photo of skin with squamous cell carcinoma",
        "benign nevus": "a photo of skin with a benign nevus",
        "seborrheic keratosis": "a photo of skin with seborrheic keratosis",
        "eczema": "a photo of skin with eczema",
        "psoriasis": "a photo of skin with psoriasis",
        "rash": "a photo of an arm with a rash",
        "normal skin": "a photo of normal skin with no lesion",
    },
}


def label_sets_manifest() -> dict[str, dict[str, list[str]]]:
    """The label sets as the manifest records them: ordered labels and their prompts."""
    return {name: {"labels": list(s), "prompts": list(s.values())} for name, s in LABEL_SETS.items()}
