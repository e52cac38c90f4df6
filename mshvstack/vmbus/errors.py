"""Protocol errors: what a hostile or buggy guest can cause (never host crashes)."""

from mshvstack.errors import MshvError


class VmbusProtocolError(MshvError):
    """A guest message, GPADL, ring or packet violates the protocol."""


class CorruptRing(VmbusProtocolError):
    """Ring indices or packet framing are invalid; the channel must be closed."""


class RingFull(MshvError):
    """No room for the packet now (not an error of the guest)."""
