"""Each op's params, declared once and checked before the op runs.

:data:`PARAMS` names every param an op reads and what it must be; :func:`check` refuses a
known param of the wrong type (or a list over its size cap) with ``invalid_request`` /
``too_large`` naming it, so an op never meets a value it can't handle and an ``internal`` error
always means a bug. ``null`` is the same as leaving a param out. Params an op doesn't know are
ignored (a newer client's optional params reach an older runtime harmlessly, see PROTOCOL.md
"Versioning"). What a value means is checked where it is used: generation options by
:class:`edge.medgemma.generation.GenerateOptions` (through :func:`android_bridge.media.generate_options`),
image sources by :func:`android_bridge.media.load`, load options by the settings dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from android_bridge.protocol import MODELS, ProtocolError, short

MAX_TEXTS = 256  # texts embedded by one embed_text
MAX_LABELS = 256  # labels scored by one classify
MAX_MESSAGES = 512  # turns of one conversation
MAX_PARTS = 256  # parts of one message
MAX_ID_CHARS = 128
MAX_K = 100  # cases one search_similar returns
MAX_PAGE = 200  # studies / reports one list returns
MAX_TEXT_CHARS = 256  # a UID, a name, a role, a date


@dataclass(frozen=True)
class P:
    """One param: its JSON type(s) and, for a list, the type of its items and its size cap."""

    kind: type | tuple[type, ...]
    items: type | None = None
    max_items: int | None = None
    choices: tuple | None = None
    minimum: int | None = None
    maximum: int | None = None
    required: bool = False
    max_chars: int | None = None


IMAGE = P((dict, str))  # an image source: checked in full by media.load
IMAGES = P(list)  # a list of sources (its cap is the bridge's images-per-request limit)
UID = P(str, required=True, max_chars=64)  # a DICOM UID, or a report id
OFFSET = P(int, minimum=0, maximum=10**9)
LIMIT = P(int, minimum=1, maximum=MAX_PAGE)
DATE = P(str, max_chars=10)  # YYYY-MM-DD (its form is checked by the store)
REPORT = P(dict, required=True)  # a report's content: checked against the report schema by the store
VERSION = P(int, minimum=1, maximum=10**6)
NAME = P(str, required=True, max_chars=MAX_TEXT_CHARS)
PARAMS: dict[str, dict[str, P]] = {
    "health": {},
    "load": {"model": P(str, choices=MODELS), "options": P(dict)},
    "unload": {"model": P(str, choices=MODELS)},
    "generate": {
        "prompt": P(str),
        "system": P(str),
        "messages": P(list, dict, MAX_MESSAGES),
        "images": IMAGES,
    },
    "prepare_image": {"images": IMAGES, "image": IMAGE},
    "embed_image": {"images": IMAGES, "image": IMAGE},
    "embed_text": {"texts": P(list, str, MAX_TEXTS), "text": P(str)},
    "classify": {"image": IMAGE, "labels": P(list, str, MAX_LABELS), "label_set": P(str)},
    "search_similar": {
        "image": IMAGE,
        "text": P(str),
        "k": P(int, minimum=1, maximum=MAX_K),
        "thumbnails": P(int),  # its range is checked by the op (android_bridge.pictures.THUMBNAIL_SIDES)
    },
    "cancel": {"target": P(str)},
    "shutdown": {},
    "list_studies": {
        "offset": OFFSET,
        "limit": LIMIT,
        "modality": P(str, max_chars=16),
        "date_from": DATE,
        "date_to": DATE,
    },
    "get_study": {"study": UID},
    "preview_image": {"image": P((dict, str), required=True)},
    "save_report": {"report_id": P(str, max_chars=64), "draft": P(dict), "final": REPORT, "source": P(dict)},
    "sign_report": {
        "report_id": UID,
        "version": P(int, minimum=1, maximum=10**6, required=True),
        "signer": NAME,
        "role": NAME,
    },
    "amend_report": {"report_id": UID, "final": REPORT, "reason": P(str, required=True, max_chars=4096)},
    "list_reports": {
        "study": P(str, max_chars=64),
        "image_sha256": P(str, max_chars=64),
        "status": P(str, choices=("draft", "signed")),
        "offset": OFFSET,
        "limit": LIMIT,
    },
    "get_report": {"report_id": UID, "version": VERSION},
    "export_report": {
        "report_id": UID,
        "version": VERSION,
        "format": P(str, choices=("sr", "fhir", "pdf"), required=True),
        "image": IMAGE,  # an uploaded image again, for the PDF's thumbnail (it must match image_sha256)
    },
    "send_report": {"report_id": UID, "version": VERSION, "destination": P(dict)},
    "outbox": {},
    "lan_pair_code": {},
    "lan_devices": {},
    "lan_revoke": {"device_id": P(str, required=True, max_chars=64)},
}
_NAMES = {dict: "an object", list: "a list", str: "a string", int: "a whole number"}
_PLURALS = {dict: "objects", str: "strings"}


def check(op: str, params: dict) -> None:
    """Check ``params`` of ``op`` against :data:`PARAMS` (and, for generate, its options and
    conversation shape).

    Raises:
        ProtocolError(invalid_request): a wrong type, a value out of range, a malformed message.
        ProtocolError(too_large): a list over its cap.
    """
    for name, spec in PARAMS[op].items():
        value = params.get(name)
        if value is not None:
            _check(name, value, spec)
        elif spec.required:
            raise ProtocolError("invalid_request", f"{op} needs '{name}'")
    if op == "generate":
        from android_bridge import media

        media.generate_options(params)  # the options' one check, before any image is decoded
        for i, m in enumerate(params.get("messages") or []):
            _check_message(i, m)


def _check(name: str, value: Any, spec: P) -> None:
    kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        want = " or ".join(_NAMES.get(k, k.__name__) for k in kinds)
        raise ProtocolError("invalid_request", f"{name} must be {want}, not {short(value)}")
    if spec.choices is not None and value not in spec.choices:
        raise ProtocolError(
            "invalid_request", f"{name} must be one of {', '.join(spec.choices)}, not {short(value)}"
        )
    if isinstance(value, str) and spec.max_chars is not None and not 0 < len(value) <= spec.max_chars:
        raise ProtocolError("invalid_request", f"{name} must be 1 to {spec.max_chars} characters")
    if isinstance(value, int) and (
        (spec.minimum is not None and value < spec.minimum)
        or (spec.maximum is not None and value > spec.maximum)
    ):
        raise ProtocolError(
            "invalid_request", f"{name} must be an integer from {spec.minimum} to {spec.maximum}"
        )
    if isinstance(value, list):
        if spec.items is not None and not all(isinstance(v, spec.items) for v in value):
            raise ProtocolError("invalid_request", f"{name} must be a list of {_PLURALS[spec.items]}")
        if spec.max_items is not None and len(value) > spec.max_items:
            raise ProtocolError(
                "too_large", f"{name}: {len(value)} items, over the limit of {spec.max_items}"
            )


def _check_message(i: int, m: dict) -> None:
    """A conversation turn: ``role`` a string, ``content`` text or a list of part objects, a
    text part's ``text`` a string (the template checks the roles themselves)."""
    where = f"messages[{i}]"
    if not isinstance(m.get("role"), str):
        raise ProtocolError("invalid_request", f"{where}.role must be a string")
    content = m.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ProtocolError("invalid_request", f"{where}.content must be a string or a list of parts")
    if len(content) > MAX_PARTS:
        raise ProtocolError(
            "too_large", f"{where}.content: {len(content)} parts, over the limit of {MAX_PARTS}"
        )
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ProtocolError("invalid_request", f"{where}.content[{j}] must be an object with a 'type'")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise ProtocolError("invalid_request", f"{where}.content[{j}].text must be a string")
