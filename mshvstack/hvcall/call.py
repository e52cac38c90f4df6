"""One way to issue any hypercall: MSHV_ROOT_HVCALL with reps, batching and
an allowlist check before the call."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mshvstack.abi import ffi, lib
from mshvstack.abi.profiles import AbiProfile, first_profile_allowing
from mshvstack.backend.base import Backend
from mshvstack.backend.handle import FdHandle
from mshvstack.errors import ErrnoError
from mshvstack.hvcall.errors import HvCallNotAllowed, HvError

MAX_PAGE = 4096
DEPOSIT_RETRIES = 64
_SUCCESS = int(lib.HV_STATUS_SUCCESS)
_TIME_OUT = int(lib.HV_STATUS_TIME_OUT)


@dataclass(frozen=True)
class HvTarget:
    """Where hypercalls go: a device, partition or VP fd and its driver profile
    (the fd through its handle, so a closed object's target refuses to issue)."""

    handle: FdHandle
    profile: AbiProfile
    on_device: bool = False

    @property
    def backend(self) -> Backend:
        return self.handle.backend

    @property
    def fd(self) -> int:
        return self.handle.fd


def _issue_once(target: HvTarget, code: int, data: bytes, reps: int, out_size: int) -> tuple[int, int, bytes]:
    """One MSHV_ROOT_HVCALL: returns (status, reps done, output)."""
    inp = ffi.from_buffer(bytearray(data.ljust(8, b"\0")))
    out = ffi.new("char[]", max(out_size, 1))
    call = _call_argument(code, inp, out, out_size)
    status, done = _issue(target, call, reps)
    return status, done, bytes(ffi.buffer(out, out_size)) if out_size else b""


def _call_argument(code: int, inp: Any, out: Any, out_size: int) -> Any:
    """The ioctl's argument over input and output buffers the caller keeps alive."""
    call = ffi.new("struct mshv_root_hvcall *")
    call.code, call.in_sz = code, len(inp)
    call.in_ptr = int(ffi.cast("uintptr_t", inp))
    if out_size:
        call.out_sz, call.out_ptr = out_size, int(ffi.cast("uintptr_t", out))
    return call


def _issue(target: HvTarget, call: Any, reps: int) -> tuple[int, int]:
    """Issue a built call: (status, reps done).

    EAGAIN (the 6.15 driver deposited memory the hypervisor asked for) is
    retried here, as that driver expects of its caller; a rep call that made
    progress first reports TIME_OUT, so the caller continues from there.
    """
    for _attempt in range(DEPOSIT_RETRIES):
        call.reps, call.status = reps, 0
        try:
            target.backend.ioctl(target.fd, lib.MSHV_ROOT_HVCALL, call)
        except ErrnoError as exc:
            if exc.errno == errno.EAGAIN:
                if reps and call.reps:
                    return _TIME_OUT, int(call.reps)
                continue
            if call.status == _SUCCESS or exc.errno in (errno.EFAULT, errno.EBADFD):
                raise
        break
    return int(call.status), int(call.reps)


class PreparedCall:
    """A simple hypercall issued again and again with the same input (a VMBus channel's
    HvSignalEventDirect after each completion): its buffers and its ioctl argument are
    built, and its allowlist checked, once; each issue is then a single ioctl."""

    def __init__(self, target: HvTarget, code: int, header: bytes | Any, out_size: int = 0) -> None:
        check_allowed(target, code)
        data = header if isinstance(header, bytes) else bytes(ffi.buffer(header))
        self.target, self.code = target, code
        padded = data.ljust(8, b"\0")
        self._input = ffi.new("char[]", len(padded))   # (initialized from bytes, cffi would add a NUL)
        ffi.memmove(self._input, padded, len(padded))
        self.output = ffi.new("uint8_t[]", max(out_size, 1))
        self._call = _call_argument(code, self._input, self.output, out_size)
        self._lock = threading.Lock()   # one argument struct: one issuer at a time

    def issue(self) -> None:
        """Issue it; ``output`` holds the result until the next issue.  HvError on failure."""
        with self._lock:
            status, _done = _issue(self.target, self._call, 0)
        if status != _SUCCESS:
            raise HvError(self.code, status)


def check_allowed(target: HvTarget, code: int) -> None:
    if not target.profile.allows(code, target.on_device):
        since = first_profile_allowing(code, target.on_device)
        where = "/dev/mshv" if target.on_device else "partition and VP fds"
        raise HvCallNotAllowed(code, target.profile.name, where, since.name if since else None)


def hvcall(target: HvTarget, code: int, header: bytes | Any, out_size: int = 0) -> bytes:
    """A simple (non-rep) hypercall.  ``header`` is the input (bytes or a cffi struct)."""
    check_allowed(target, code)
    data = header if isinstance(header, bytes) else bytes(ffi.buffer(header))
    status, _reps, output = _issue_once(target, code, data, 0, out_size)
    if status != _SUCCESS:
        raise HvError(code, status)
    return output


def hvcall_rep(target: HvTarget, code: int, header: bytes | Any, elements: list[bytes], out_element_size: int = 0) -> list[bytes]:
    """A rep hypercall over ``elements``; returns one output element per rep.

    Splits the reps into batches that fit the 4 KiB input and output pages,
    and re-issues from the completed count when the driver (6.15) or the
    hypervisor stops early, as the newest driver does in the kernel.
    """
    check_allowed(target, code)
    head = header if isinstance(header, bytes) else bytes(ffi.buffer(header))
    if not elements:
        return []
    in_size = len(elements[0])
    per_batch = (MAX_PAGE - len(head)) // in_size
    if out_element_size:
        per_batch = min(per_batch, MAX_PAGE // out_element_size)
    if per_batch <= 0:
        raise ValueError("hypercall header leaves no room for rep elements")
    outputs: list[bytes] = []
    done = 0
    stalls = 0
    while done < len(elements):
        batch = elements[done : done + per_batch]
        status, completed, output = _issue_once(target, code, head + b"".join(batch), len(batch), out_element_size * len(batch))
        completed = _usable_reps(target, status, min(completed, len(batch)), out_element_size)
        outputs += _split(output, out_element_size, completed)
        done += completed
        if status == _SUCCESS and completed == len(batch):
            continue
        stalls = 0 if completed else stalls + 1
        if status not in (_SUCCESS, _TIME_OUT) or stalls > 3:
            raise HvError(code, status if status != _SUCCESS else _TIME_OUT, done)
    return outputs


def _usable_reps(target: HvTarget, status: int, completed: int, out_element_size: int) -> int:
    """Reps whose results we actually have.

    On failure the newest driver copies no output at all, so reps that
    produced output must be issued again; the 6.15 driver copied it anyway.
    """
    if status != _SUCCESS and out_element_size and not target.profile.output_copied_on_failure:
        return 0
    return completed


def _split(output: bytes, size: int, count: int) -> list[bytes]:
    return [output[i * size : (i + 1) * size] for i in range(count)] if size else [b""] * count


def hvcall_rep_indexed(target: HvTarget, code: int, header_at: Callable[[int], bytes], count: int,
                       out_element_size: int) -> list[bytes]:
    """A rep hypercall whose reps carry no input elements (the header names the
    first item, e.g. a GPA page number); continuation rebuilds the header at
    the first rep not yet done."""
    check_allowed(target, code)
    per_batch = MAX_PAGE // out_element_size
    outputs: list[bytes] = []
    stalls = 0
    while len(outputs) < count:
        n = min(per_batch, count - len(outputs))
        status, done, output = _issue_once(target, code, header_at(len(outputs)), n, n * out_element_size)
        done = _usable_reps(target, status, min(done, n), out_element_size)
        outputs += _split(output, out_element_size, done)
        if status == _SUCCESS and done == n:
            continue
        stalls = 0 if done else stalls + 1
        if status not in (_SUCCESS, _TIME_OUT) or stalls > 3:
            raise HvError(code, status if status != _SUCCESS else _TIME_OUT, len(outputs))
    return outputs
