"""Chat messages -> one prompt string, through a Jinja template (the package's plain default or --chat-template).

The template sees `messages` (each with `role` and `content` as plain strings) and `add_generation_prompt` (always
true), the names Hugging Face chat templates use, so many of those work unchanged. It renders in Jinja's sandbox with
StrictUndefined: a template is configuration, but a typo must fail loudly and it must not reach Python internals.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .protocol import ApiError, ChatMessage

DEFAULT_TEMPLATE = "chat_template.jinja"
MAX_TEMPLATE_BYTES = 1 << 20


class ChatTemplateError(ValueError):
    """The chat template file cannot be read or compiled."""


class ChatTemplate:
    def __init__(self, source: str, origin: str) -> None:
        self.origin = origin
        environment = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"chat template {origin}: {err}") from err

    @classmethod
    def load(cls, path: Path | None = None) -> ChatTemplate:
        """`path`, or the package's default plain template when None."""
        if path is None:
            source = resources.files(__package__).joinpath("templates").joinpath(DEFAULT_TEMPLATE).read_text("utf-8")
            return cls(source, f"(default {DEFAULT_TEMPLATE})")
        try:
            if path.stat().st_size > MAX_TEMPLATE_BYTES:
                raise ChatTemplateError(f"chat template {path}: larger than {MAX_TEMPLATE_BYTES} bytes")
            return cls(path.read_text("utf-8"), str(path))
        except (OSError, UnicodeDecodeError) as err:
            raise ChatTemplateError(f"chat template {path}: {err}") from err

    def render(self, messages: Sequence[ChatMessage]) -> str:
        plain = [{"role": m.role, "content": m.text, **({"name": m.name} if m.name else {})} for m in messages]
        try:
            return self._template.render(messages=plain, add_generation_prompt=True)
        except jinja2.TemplateError as err:
            # A template that fails on these messages (e.g. one that raises on a role it does not know) is the
            # request's problem as the template sees it; its message says why.
            raise ApiError(400, f"messages: the chat template {self.origin} failed: {err}", param="messages",
                           code="invalid_value") from err
