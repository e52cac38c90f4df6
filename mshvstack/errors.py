"""Exceptions shared by every layer (rooted in MshvError)."""

from __future__ import annotations

import errno as _errno
import os


class MshvError(Exception):
    """Base class of every error mshvstack raises on purpose."""


class ErrnoError(MshvError):
    """A /dev/mshv request failed with an errno.

    Carries the errno, the name of the request (ioctl name, "open", "mmap")
    and a one-line explanation of what that errno means for that request.
    """

    def __init__(self, err: int, request: str, explanation: str = "") -> None:
        self.errno = err
        self.request = request
        self.explanation = explanation or os.strerror(err)
        super().__init__(f"{request}: {_errno.errorcode.get(err, err)}: {self.explanation}")


class DeviceUnavailable(ErrnoError):
    """/dev/mshv cannot be opened on this machine."""
