"""Server-sent events of Triton's `/generate_stream`: `data: <json>` lines, a blank line ends an event.

There is no `[DONE]` sentinel (the body just ends), and the HTTP status is fixed by the FIRST response: a later
error arrives as `data: {"error": "..."}` under status 200, so every event is checked.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import RequestError, clean_server_message


class SseParser:
    """Feed decoded lines; get back each event's JSON payload, with errors raised as `RequestError`."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> dict[str, Any] | None:
        line = line.rstrip("\r\n")
        if not line:
            return self._flush()
        if line.startswith(":"):  # an SSE comment / keep-alive
            return None
        key, _, value = line.partition(":")
        if key == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def close(self) -> dict[str, Any] | None:
        return self._flush()

    def _flush(self) -> dict[str, Any] | None:
        if not self._data:
            return None
        text, self._data = "\n".join(self._data), []
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as err:
            raise RequestError(f"malformed event from /generate_stream: {text[:200]!r}") from err
        if not isinstance(payload, dict):
            raise RequestError(f"unexpected event from /generate_stream: {text[:200]!r}")
        if "error" in payload:
            raise RequestError(clean_server_message(str(payload["error"])))
        return payload


def triton_error(status: int, body: bytes) -> RequestError | None:
    """The error of a non-200 answer whose body is Triton's JSON `{"error": ...}` or one SSE `data:` event carrying
    it; None when the body is neither (then something other than Triton answered)."""
    text = body.decode("utf-8", errors="replace").strip()
    candidates = [text] + [line.partition(":")[2].strip() for line in text.splitlines() if line.startswith("data:")]
    for candidate in candidates:
        try:
            payload = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(payload, dict) and "error" in payload:
            return RequestError(clean_server_message(str(payload["error"])), status=str(status))
    return None


def error_from_body(status: int, body: bytes) -> RequestError:
    """The error of a non-200 answer, whatever its body."""
    text = body.decode("utf-8", errors="replace").strip()
    return triton_error(status, body) or RequestError(
        f"HTTP {status}: {clean_server_message(text) if text else 'no details'}", status=str(status))
