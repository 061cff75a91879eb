"""Turn a conversation into the model's prompt text, with its own chat template.

Messages are OpenAI-style: ``{"role": "system"|"user"|"assistant", "content": str | [parts]}``
with parts ``{"type": "text", "text": ...}`` or ``{"type": "image", ...}``. Gemma 3 has no
system role: its template folds the system text into the first user turn. Image parts become
the multimodal library's media marker, which it replaces by the model's image tokens
(``<start_of_image>`` + 256 soft tokens + ``<end_of_image>`` for MedGemma).
"""

from __future__ import annotations

from functools import lru_cache

from edge.errors import UsageError

ROLES = ("system", "user", "assistant")


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined
    )
    return env.from_string(template)


def _raise(message: str):
    raise UsageError(f"conversation not accepted by the chat template: {message}")


def normalize(messages: list[dict], media_marker: str | None) -> tuple[list[dict], int]:
    """Validate roles and parts; images → marker text. Returns (messages, number of images)."""
    out: list[dict] = []
    n_images = 0
    for m in messages:
        role = m.get("role")
        if role not in ROLES:
            raise UsageError(f"message role must be one of {', '.join(ROLES)}, not {role!r}")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise UsageError(f"message content must be text or a list of parts, not {type(content).__name__}")
        parts = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind in ("image", "image_url"):
                if media_marker is None:
                    raise UsageError("this model has no vision projector: it can't take images")
                n_images += 1
                parts.append({"type": "text", "text": media_marker})
            else:
                raise UsageError(f"unknown content part type {kind!r} (text or image)")
        if role == "system" or all(p["type"] == "text" for p in parts) and media_marker is None:
            out.append({"role": role, "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": role, "content": parts})
    return out, n_images


def render(template: str, messages: list[dict], *, bos_token: str, eos_token: str) -> str:
    """The prompt text for ``messages`` with the generation prompt appended."""
    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=bos_token,
            eos_token=eos_token,
            raise_exception=_raise,
        )
    except UsageError:
        raise
    except Exception as exc:  # jinja2 errors: the template or the conversation is malformed
        raise UsageError(f"can't render the chat template: {exc}") from None


def build_messages(
    question: str, *, images: int = 0, system: str | None = None, history: list[dict] | None = None
) -> list[dict]:
    """The conversation for one question (+ ``images`` image parts before the text)."""
    msgs: list[dict] = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.extend(history or [])
    if images:
        msgs.append(
            {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]}
        )
    else:
        msgs.append({"role": "user", "content": question})
    return msgs
