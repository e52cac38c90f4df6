"""Split a byte stream into JSON values, as a QMP server must read its clients.

QMP clients send JSON objects back to back with or without newlines
(qemu.qmp sends none), so values are delimited by their brackets, not by
lines.  The splitter tracks nesting and strings byte by byte, parses a value
once its brackets balance, and bounds both size and depth: a hostile client
gets an error per bad value, never unbounded memory or recursion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_VALUE = 1 << 20
MAX_DEPTH = 64
_OPEN, _CLOSE = b"{[", b"}]"
_WHITESPACE = b" \t\r\n"


@dataclass(frozen=True)
class JsonInputError:
    """One bad input value (reported to the client; the stream goes on)."""

    message: str


class JsonSplitter:
    def __init__(self, max_value: int = MAX_VALUE, max_depth: int = MAX_DEPTH) -> None:
        self.max_value, self.max_depth = max_value, max_depth
        self._value = bytearray()
        self._depth = 0
        self._in_string = self._escape = False
        self._problem: str | None = None   # the value being skipped and why
        self._garbage = bytearray()         # bytes outside any object, up to the next line or bracket

    @property
    def problem(self) -> str | None:
        """Why the value being read will be an error (too deep, too long), known before it ends."""
        return self._problem

    def feed(self, data: bytes) -> list[Any | JsonInputError]:
        """The values (or errors) completed by ``data``, in order."""
        out: list[Any | JsonInputError] = []
        for byte in data:
            if self._depth == 0:
                self._between_values(byte, out)
            else:
                self._inside_value(byte, out)
        return out

    def _between_values(self, byte: int, out: list[Any | JsonInputError]) -> None:
        if byte in _OPEN:
            self._flush_garbage(out)
            self._depth, self._value, self._problem = 1, bytearray([byte]), None
        elif byte == 0x0A or (byte in _WHITESPACE and not self._garbage):
            self._flush_garbage(out)
        elif len(self._garbage) <= self.max_value:
            self._garbage.append(byte)

    def _flush_garbage(self, out: list[Any | JsonInputError]) -> None:
        text, self._garbage = bytes(self._garbage).strip(), bytearray()
        if not text:
            return
        try:
            json.loads(text)
        except ValueError:
            out.append(JsonInputError("JSON parse error, invalid token"))
        else:
            out.append(JsonInputError("QMP input must be a JSON object"))

    def _inside_value(self, byte: int, out: list[Any | JsonInputError]) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif byte == 0x5C:  # backslash
                self._escape = True
            elif byte == 0x22:  # quote
                self._in_string = False
        elif byte == 0x22:
            self._in_string = True
        elif byte in _OPEN:
            self._depth += 1
            if self._depth > self.max_depth and self._problem is None:
                self._problem = f"JSON nesting deeper than {self.max_depth}"
        elif byte in _CLOSE:
            self._depth -= 1
        if self._problem is None:
            self._value.append(byte)
            if len(self._value) > self.max_value:
                self._problem = f"JSON value longer than {self.max_value} bytes"
        if self._problem is not None:
            self._value = bytearray()
        if self._depth == 0:
            out.append(self._complete())

    def _complete(self) -> Any | JsonInputError:
        if self._problem is not None:
            return JsonInputError(self._problem)
        try:
            return json.loads(bytes(self._value))
        except (ValueError, RecursionError) as exc:
            return JsonInputError(f"JSON parse error, {exc}")
        finally:
            self._value = bytearray()
