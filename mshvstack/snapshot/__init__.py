"""Snapshots and migration streams: a machine's state as typed records, framed,
checksummed and bounded (docs/snapshot.md)."""

from mshvstack.snapshot.records import MemoryChunk, VpRecord
from mshvstack.snapshot.stream import Section, SectionKind, SnapshotError, StreamReader, StreamWriter

__all__ = ["MemoryChunk", "Section", "SectionKind", "SnapshotError", "StreamReader", "StreamWriter", "VpRecord"]
