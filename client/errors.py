"""Client errors, and the cleaning that turns Triton's error text into one readable line."""

from __future__ import annotations

import re


class TextClientError(Exception):
    """Base class: every error the client raises. `str(err)` is one readable line."""


class ServerUnavailableError(TextClientError):
    """The server could not be reached (connection refused, reset, DNS), even after the retries."""


class RequestTimeoutError(TextClientError):
    """The server accepted the connection but did not answer within the client's timeout."""


class WrongEndpointError(TextClientError):
    """Something answered at the address, but not in the chosen protocol: usually the wrong port. Never retried."""


class RequestError(TextClientError):
    """The server rejected or failed the request (bad input, model error). Never retried."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


# Noise Triton wraps around a model's own message; removed in this order, repeatedly, from the front.
_NOISE_PREFIXES = (
    re.compile(r"^\[StatusCode\.[A-Z_]+\]\s*"),
    re.compile(r"^in ensemble '[^']*',\s*"),
    re.compile(r"^Failed to process the request\(s\) for model instance '[^']*',\s*message:\s*"),
    re.compile(r"^(?:Triton)?(?:Model)?Exception:\s*"),
    re.compile(r"^(?:pb_utils\.)?TritonError:\s*"),
    re.compile(r"^(?:ValueError|RuntimeError|KeyError|TypeError):\s*"),
    re.compile(r"^Error:\s*", re.IGNORECASE),
    re.compile(r"^error:\s*"),
)
_TRACEBACK = re.compile(r"Traceback \(most recent call last\):.*", re.DOTALL)


def clean_server_message(message: str) -> str:
    """Triton's error text reduced to the model's own words, on one line.

    "[StatusCode.INVALID_ARGUMENT] in ensemble 'ensemble', Failed to process the request(s) for model instance
    'preprocessing_0_0', message: ValueError: max_tokens must be >= 1" -> "max_tokens must be >= 1".
    A Python traceback keeps only its last line (the exception itself).
    """
    text = message.strip()
    traceback = _TRACEBACK.search(text)
    if traceback:
        lines = [line.strip() for line in traceback.group(0).splitlines() if line.strip()]
        before = text[: traceback.start()].strip()
        text = lines[-1] if len(lines) > 1 else before
    changed = True
    while changed:
        changed = False
        for pattern in _NOISE_PREFIXES:
            stripped = pattern.sub("", text, count=1)
            if stripped != text:
                text, changed = stripped.strip(), True
    return " ".join(text.split()) or message.strip()
