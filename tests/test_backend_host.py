"""The real-device backend's error mapping, exercised without Hyper-V."""

from __future__ import annotations

import errno
import os

import pytest

from mshvstack.abi import ffi, lib
from mshvstack.backend import Backend, FdKind, HostBackend
from mshvstack.backend.ioctls import request_name, requests_for
from mshvstack.errors import DeviceUnavailable, ErrnoError


def test_host_backend_satisfies_protocol() -> None:
    assert isinstance(HostBackend(), Backend)


def test_missing_device_names_the_cause(tmp_path: os.PathLike[str]) -> None:
    backend = HostBackend(path=os.path.join(tmp_path, "mshv"))
    with pytest.raises(DeviceUnavailable) as info:
        backend.open()
    assert info.value.errno == errno.ENOENT
    assert "not running as a Hyper-V root partition" in str(info.value)
    assert "--backend sim" in str(info.value)


def test_ioctl_on_non_mshv_fd_is_enotty_with_request_name() -> None:
    backend = HostBackend(path="/dev/null")
    fd = backend.open()
    try:
        arg = ffi.new("struct mshv_create_partition *")
        with pytest.raises(ErrnoError) as info:
            backend.ioctl(fd, lib.MSHV_CREATE_PARTITION, arg)
    finally:
        backend.close(fd)
    assert info.value.errno == errno.ENOTTY
    assert info.value.request == "MSHV_CREATE_PARTITION"
    assert "does not accept that request" in str(info.value)


def test_mmap_error_is_explained() -> None:
    backend = HostBackend(path="/dev/null")
    fd = backend.open()
    try:
        with pytest.raises(ErrnoError) as info:
            backend.mmap(fd, 4096, 0)
    finally:
        backend.close(fd)
    assert info.value.request == "mmap"


def test_request_names_depend_on_fd_kind() -> None:
    # nr 0 is a different request on each fd kind; the numbers collide only
    # where the argument sizes agree, so the name must follow the fd kind.
    assert request_name(lib.MSHV_RUN_VP, FdKind.VP) == "MSHV_RUN_VP"
    assert request_name(lib.MSHV_INITIALIZE_PARTITION, FdKind.PARTITION) == "MSHV_INITIALIZE_PARTITION"
    assert request_name(lib.MSHV_ROOT_HVCALL, FdKind.VP) == "MSHV_ROOT_HVCALL"
    assert request_name(0x1234) == "ioctl 0x1234"
    for kind in FdKind:
        assert len(requests_for(kind)) == len(set(requests_for(kind)))


@pytest.mark.device
def test_real_device_opens() -> None:
    backend = HostBackend()
    fd = backend.open()
    backend.close(fd)
