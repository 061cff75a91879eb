"""Request params → what the runtime takes: conversations, images, generation options.

An image source is one of ``{"base64": "..."}``, ``{"url": "data:image/png;base64,..."}``,
``{"path": "/abs/file.dcm"}`` (only where the bridge allows paths), or a data-URL string;
any of them may add ``"frame": N`` for a multi-frame DICOM. Inside ``messages``, an image part
carries its source: ``{"type": "image", "base64": ...}`` or OpenAI's ``{"type": "image_url",
"image_url": {"url": "data:..."}}``. Remote URLs are refused: the runtime never goes online.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from android_bridge.protocol import ProtocolError
from edge.media.images import LoadedImage, load_image

_OPTION_TYPES = {
    "max_tokens": int,
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": int,
    "min_p": (int, float),
    "repeat_penalty": (int, float),
    "seed": int,
    "stop": list,
    "schema": dict,
}


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


def load(src: Any, *, allow_paths: bool = True) -> LoadedImage:
    """Decode one image source (see the module docstring).

    Raises:
        ProtocolError(invalid_request): a malformed source, a path where paths aren't allowed.
        InputError / TooLargeError: from edge.media.images (not an image, over the size limits).
    """
    frame = None
    if isinstance(src, str):
        data: Any = decode_data_url(src)
    elif isinstance(src, dict):
        frame = src.get("frame")
        if frame is not None and not isinstance(frame, int):
            raise _bad("frame must be an integer")
        if isinstance(src.get("base64"), str):
            data = _b64(src["base64"])
        elif isinstance(src.get("url"), str):
            data = decode_data_url(src["url"])
        elif isinstance(src.get("image_url"), dict | str):  # an OpenAI image_url part
            iu = src["image_url"]
            data = decode_data_url(iu if isinstance(iu, str) else str(iu.get("url", "")))
        elif isinstance(src.get("path"), str):
            if not allow_paths:
                raise _bad("this transport does not accept file paths; send the image as base64")
            data = src["path"]
        else:
            raise _bad("an image needs one of: base64, url (data:), path")
    else:
        raise _bad("an image must be an object or a data: URL string")
    return load_image(data, frame=frame)


def image_list(params: dict) -> list:
    srcs = params.get("images", [params["image"]] if "image" in params else None)
    if not isinstance(srcs, list) or not srcs:
        raise _bad("give 'image' or 'images' (a non-empty list)")
    return srcs


def one_image(params: dict) -> Any:
    if "image" not in params:
        raise _bad("give 'image' (or 'text' where the op takes text)")
    return params["image"]


def conversation(params: dict, *, allow_paths: bool = True) -> tuple[list[dict], list[LoadedImage]]:
    """The messages for MedGemma and their images, in order, from ``generate``'s params.

    Either ``messages`` (OpenAI style, image parts carrying their sources) or ``prompt`` with
    optional ``images`` (placed before the text) and ``system``.
    """
    messages = params.get("messages")
    if messages is None:
        prompt = params.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _bad("generate needs 'messages' or a non-empty 'prompt'")
        srcs = params.get("images") or []
        if not isinstance(srcs, list):
            raise _bad("images must be a list")
        content: Any = [{"type": "image", **_as_part(s)} for s in srcs] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content if srcs else prompt}]
        if isinstance(params.get("system"), str):
            messages.insert(0, {"role": "system", "content": params["system"]})
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise _bad("messages must be a non-empty list of objects")
    out, images = [], []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict):
                    raise _bad("message parts must be objects")
                if part.get("type") in ("image", "image_url"):
                    images.append(load(part, allow_paths=allow_paths))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            content = parts
        out.append({"role": m.get("role"), "content": content})
    return out, images


def _as_part(src: Any) -> dict:
    return {"url": src} if isinstance(src, str) else dict(src) if isinstance(src, dict) else {"bad": src}


def generate_options(params: dict):
    """GenerateOptions from ``generate``'s params (unknown types refused, not ignored)."""
    from edge.medgemma.model import GenerateOptions

    kwargs = {}
    for key, kind in _OPTION_TYPES.items():
        value = params.get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _bad(f"{key} has the wrong type")
        kwargs[key] = value
    if kwargs.get("max_tokens", 1) <= 0:
        raise _bad("max_tokens must be positive")
    if "stop" in kwargs and not all(isinstance(s, str) for s in kwargs["stop"]):
        raise _bad("stop must be a list of strings")
    return GenerateOptions(**kwargs)
