from collections.abc import Callable
from typing import Any

UINT: int
BOOL: int
HEADER: int
SEGMENT: int
BYTES: int

class Decoder:
    def __init__(self, result: type, plan: tuple[tuple[Any, ...], ...], header_memo: dict[bytes, Any],
                 header_miss: Callable[[Any, int], Any], segment_memo: dict[tuple[int, int, int, int], Any],
                 segment_miss: Callable[[tuple[int, int, int, int]], Any]) -> None: ...
    def __call__(self, buffer: Any, offset: int) -> Any: ...
