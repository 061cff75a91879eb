"""Request params → what the runtime takes: conversations, images, generation options.

An image source is one of ``{"base64": "..."}``, ``{"url": "data:image/png;base64,..."}``,
``{"path": "/abs/file.dcm"}`` (only where the bridge allows paths), ``{"study": UID,
"instance": UID}`` (a DICOM instance the runtime received, from its study store; ``instance``
left out: the study's first displayable one), or a data-URL string; any of them may add
``"frame": N`` for a multi-frame DICOM. Inside ``messages``, an image part
carries its source: ``{"type": "image", "base64": ...}`` or OpenAI's ``{"type": "image_url",
"image_url": {"url": "data:..."}}``. Remote URLs are refused: the runtime never goes online.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from android_bridge.protocol import ProtocolError
from edge.errors import TooLargeError, UsageError
from edge.medgemma.generation import GenerateOptions
from edge.media.images import MAX_PIXELS, LoadedImage, load_image
from edge.settings import fields, from_mapping

OPTION_KEYS = tuple(f.name for f in fields(GenerateOptions))  # generate's params that are options
MAX_IMAGES = 16  # images (DICOM frames) decoded for one request
MAX_REQUEST_PIXELS = 128_000_000  # pixels decoded for one request, all its images together


def _bad(message: str) -> ProtocolError:
    return ProtocolError("invalid_request", message)


def decode_data_url(url: str) -> bytes:
    """``data:<mime>;base64,<data>`` → bytes. Anything else (http, file) is refused."""
    if not url.startswith("data:"):
        raise _bad("image URLs must be data: URLs (base64); the runtime does not fetch remote images")
    head, _, data = url.partition(",")
    if not head.endswith(";base64"):
        raise _bad("data: URLs must be base64-encoded")
    return _b64(data)


def _b64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("image data is not valid base64") from None


def load(
    src: Any, *, allow_paths: bool = True, max_pixels: int = MAX_PIXELS, studies: Any = None
) -> LoadedImage:
    """Decode one image source (see the module docstring). ``studies`` is the runtime's
    :class:`edge.studies.store.StudyStore` (None: study sources are refused as not available).

    Raises:
        ProtocolError(invalid_request): a malformed source, a path where paths aren't allowed.
        ProtocolError(not_loaded): a study source on a runtime without a study store.
        NotFoundError: a study or instance the store doesn't hold.
        InputError / TooLargeError: from edge.media.images (not an image, over the size limits).
    """
    frame = None
    if isinstance(src, str):
        data: Any = decode_data_url(src)
    elif isinstance(src, dict):
        frame = src.get("frame")
        if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int) or frame < 0):
            raise _bad("frame must be a whole number from 0")
        if isinstance(src.get("base64"), str):
            data = _b64(src["base64"])
        elif isinstance(src.get("url"), str):
            data = decode_data_url(src["url"])
        elif isinstance(src.get("image_url"), dict | str):  # an OpenAI image_url part
            iu = src["image_url"]
            url = iu if isinstance(iu, str) else iu.get("url")
            if not isinstance(url, str):
                raise _bad("image_url needs 'url': a data: URL string")
            data = decode_data_url(url)
        elif "study" in src:
            data = study_instance_path(src, studies)
        elif isinstance(src.get("path"), str):
            if not allow_paths:
                raise _bad("this transport does not accept file paths; send the image as base64")
            data = src["path"]
        else:
            raise _bad("an image needs one of: base64, url (data:), path, study (+ instance)")
    else:
        raise _bad("an image must be an object or a data: URL string")
    return load_image(data, frame=frame, max_pixels=max_pixels)


def source_bytes(src: Any) -> bytes:
    """The bytes of an inline source (base64 or a data: URL), e.g. to check them against a hash."""
    if isinstance(src, str):
        return decode_data_url(src)
    if isinstance(src, dict) and isinstance(src.get("base64"), str):
        return _b64(src["base64"])
    if isinstance(src, dict) and isinstance(src.get("url"), str):
        return decode_data_url(src["url"])
    raise _bad("give the image inline: base64 or a data: URL")


def study_instance_path(src: dict, studies: Any):
    """The stored file of ``{"study": UID, "instance"?: UID}``: the named instance, else the
    study's first displayable one. The store is the runtime's own, so this works where file
    paths are refused."""
    study, instance = src.get("study"), src.get("instance")
    if not isinstance(study, str) or not study or len(study) > 64:
        raise _bad("study must be a DICOM UID (a string of up to 64 characters)")
    if instance is not None and (not isinstance(instance, str) or not instance or len(instance) > 64):
        raise _bad("instance must be a DICOM UID (a string of up to 64 characters)")
    if studies is None:
        raise ProtocolError(
            "not_loaded", "this runtime keeps no received studies (start serve with --dicom-port or --data)"
        )
    if instance is None:
        # the catalogue's query first; the study's listing only to say why nothing can be shown
        instance = studies.first_displayable(study) or first_displayable(studies.get_study(study))
    return studies.instance_path(study, instance)


def first_displayable(study: dict) -> str:
    """The SOP Instance UID of ``study``'s first displayable instance (by series, then instance
    number), or InputError saying why none can be shown."""
    from edge.errors import InputError

    reasons = []
    for series in study.get("series", []):
        for inst in series.get("instances", []):
            if inst.get("displayable"):
                return inst["sop_instance_uid"]
            reasons.append(inst.get("why_not") or "not displayable")
    why = f": {reasons[0]}" if reasons else " (it has no instances)"
    raise InputError(f"no instance of this study can be shown on this device{why}")


class ImageBudget:
    """What one request may decode: ``max_images`` images (a DICOM frame counts as one) and
    ``max_pixels`` pixels in all. Each image is refused from its header (``too_large``) once it
    would go over, before its pixels are decoded."""

    def __init__(
        self, max_images: int = MAX_IMAGES, max_pixels: int = MAX_REQUEST_PIXELS, *, studies: Any = None
    ):
        self.max_images = max_images
        self.max_pixels = max_pixels
        self.studies = studies  # the runtime's study store, for {"study": ...} sources
        self.images = 0
        self.pixels = 0

    def expect(self, n: int) -> None:
        """Refuse a request that names more than ``max_images`` images, before decoding any."""
        if self.images + n > self.max_images:
            raise ProtocolError(
                "too_large", f"{self.images + n} images in one request, over the limit of {self.max_images}"
            )

    def load(self, src: Any, *, allow_paths: bool = True) -> LoadedImage:
        """:func:`load` within what is left of the budget."""
        self.expect(1)
        left = self.max_pixels - self.pixels
        limit = min(MAX_PIXELS, left)
        try:
            image = load(src, allow_paths=allow_paths, max_pixels=max(1, limit), studies=self.studies)
        except TooLargeError as exc:
            if limit >= MAX_PIXELS:
                raise
            raise ProtocolError(
                "too_large",
                f"{exc} (the images of one request may have {self.max_pixels / 1e6:.0f} MP in all)",
            ) from None
        self.images += 1
        w, h = image.source_size
        self.pixels += w * h
        return image


def image_list(params: dict) -> list:
    srcs = params.get("images")
    if srcs is None and params.get("image") is not None:
        srcs = [params["image"]]
    if not isinstance(srcs, list) or not srcs:
        raise _bad("give 'image' or 'images' (a non-empty list)")
    return srcs


def one_image(params: dict) -> Any:
    if params.get("image") is None:
        raise _bad("give 'image' (or 'text' where the op takes text)")
    return params["image"]


def conversation(
    params: dict, *, allow_paths: bool = True, budget: ImageBudget | None = None
) -> tuple[list[dict], list[LoadedImage]]:
    """The messages for MedGemma and their images, in order, from ``generate``'s params.

    Either ``messages`` (OpenAI style, image parts carrying their sources) or ``prompt`` with
    optional ``images`` (placed before the text) and ``system``. Images are decoded within
    ``budget`` (default: :class:`ImageBudget`'s defaults).
    """
    budget = budget or ImageBudget()
    messages = params.get("messages")
    if messages is None:
        prompt = params.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _bad("generate needs 'messages' or a non-empty 'prompt'")
        srcs = params.get("images") or []
        if not isinstance(srcs, list):
            raise _bad("images must be a list")
        content: Any = [{**_as_part(s), "type": "image"} for s in srcs] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content if srcs else prompt}]
        if isinstance(params.get("system"), str):
            messages.insert(0, {"role": "system", "content": params["system"]})
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise _bad("messages must be a non-empty list of objects")
    budget.expect(
        sum(
            isinstance(p, dict) and p.get("type") in ("image", "image_url")
            for m in messages
            if isinstance(m.get("content"), list)
            for p in m["content"]
        )
    )
    out, images = [], []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict):
                    raise _bad("message parts must be objects")
                if part.get("type") in ("image", "image_url"):
                    images.append(budget.load(part, allow_paths=allow_paths))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            content = parts
        out.append({"role": m.get("role"), "content": content})
    return out, images


def _as_part(src: Any) -> dict:
    return {"url": src} if isinstance(src, str) else dict(src) if isinstance(src, dict) else {"bad": src}


def generate_options(params: dict) -> GenerateOptions:
    """GenerateOptions from ``generate``'s params, each checked against its declaration (type,
    range, finite): a bad value is ``invalid_request`` naming the option. ``null`` = the default."""
    values = {k: params[k] for k in OPTION_KEYS if params.get(k) is not None}
    try:
        return from_mapping(GenerateOptions, values)
    except UsageError as exc:
        raise _bad(str(exc)) from None
