"""KVP (data exchange) IC: key/value pools shared with the guest.

The host can set, get, delete and enumerate pairs; enumerating the guest's
AUTO pool yields what the guest reports about itself (host name, IP
addresses, OS version).  One transaction at a time, as Linux requires;
callers wait for the guest's answer with a timeout (the guest may answer
only once its KVP daemon runs).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from mshvstack.abi import ffi, lib
from mshvstack.vmbus.errors import VmbusProtocolError
from mshvstack.vmbus.providers.ic import IcMessage, IcProvider

MSG = "struct hv_kvp_msg"
POOLS = {"external": int(lib.KVP_POOL_EXTERNAL), "guest": int(lib.KVP_POOL_GUEST), "auto": int(lib.KVP_POOL_AUTO),
         "auto_external": int(lib.KVP_POOL_AUTO_EXTERNAL)}


class KvpError(VmbusProtocolError):
    """The guest refused or could not answer a KVP request."""


@dataclass(frozen=True)
class KvpReply:
    status: int
    key: str
    value: str


def _utf16(text: str, limit: int) -> bytes:
    data = text.encode("utf-16-le") + b"\0\0"
    if len(data) > limit:
        raise ValueError(f"{text[:20]!r}... is longer than {limit // 2 - 1} characters")
    return data


def _from_utf16(raw: bytes, size: int, limit: int) -> str:
    data = bytes(raw)[: min(size, limit)]
    return data.decode("utf-16-le", errors="replace").split("\0", 1)[0]


class Kvp(IcProvider):
    name = "kvp"
    class_id = uuid.UUID("a9a0f4e7-5a45-4d96-b827-8a841e8c03e6")
    instance_id = uuid.UUID("242ff919-07db-4180-9c2e-b86cb68c8c55")
    msgtype = int(lib.ICMSGTYPE_KVPEXCHANGE)
    versions = ((3, 0), (4, 0))

    def __init__(self, instance_id: uuid.UUID | None = None) -> None:
        super().__init__(instance_id)
        self.reply: KvpReply | None = None
        self.outstanding = False

    # ---- requests (send; the answer arrives as `reply`)
    def _send(self, operation: int, pool: int, fill: Any = None) -> None:
        with self._cond:   # wait_reply gives up on a request under it (the requests themselves run under the server's lock)
            if self.outstanding:
                raise KvpError("a KVP request is already outstanding")
        msg = ffi.new(f"{MSG} *")
        msg.kvp_hdr.operation, msg.kvp_hdr.pool = operation, pool
        if fill is not None:
            fill(msg.body)
        with self._cond:
            self.reply = None
            self.outstanding = True
        self.send_request(bytes(ffi.buffer(msg)))

    @staticmethod
    def _value(target: Any, key: str, value: str = "") -> None:
        k, v = _utf16(key, lib.KVP_MAX_KEY_SIZE), _utf16(value, lib.KVP_MAX_VALUE_SIZE)
        target.value_type, target.key_size, target.value_size = lib.KVP_REG_SZ, len(k), len(v)
        ffi.memmove(target.key, k, len(k))
        ffi.memmove(target.value, v, len(v))

    def set(self, pool: int, key: str, value: str) -> None:
        self._send(lib.KVP_OP_SET, pool, lambda body: self._value(body.set, key, value))

    def get(self, pool: int, key: str) -> None:
        self._send(lib.KVP_OP_GET, pool, lambda body: self._value(body.get, key))

    def delete(self, pool: int, key: str) -> None:
        def fill(body: Any) -> None:
            k = _utf16(key, lib.KVP_MAX_KEY_SIZE)
            body.delete_.key_size = len(k)
            ffi.memmove(body.delete_.key, k, len(k))
        self._send(lib.KVP_OP_DELETE, pool, fill)

    def enumerate(self, pool: int, index: int) -> None:
        self._send(lib.KVP_OP_ENUMERATE, pool, lambda body: setattr(body.enumerate, "index", index))

    def wait_reply(self, timeout: float) -> KvpReply:
        """Wait for the answer (never with the VMBus server's lock held: the answer needs it)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.reply is not None or self.channel is None, timeout):
                self.outstanding = False  # give up on this one; a late answer is ignored
                raise KvpError(f"the guest did not answer the KVP request within {timeout:g} s (is its KVP daemon running?)")
        if self.reply is None:
            raise KvpError("the KVP channel closed")
        return self.reply

    def on_response(self, message: IcMessage) -> None:
        with self._cond:
            self.outstanding = False
        if len(message.body) < ffi.sizeof("struct hv_kvp_hdr"):
            raise VmbusProtocolError("KVP response too short")
        msg = ffi.new(f"{MSG} *")
        ffi.memmove(msg, message.body[: ffi.sizeof(MSG)], min(len(message.body), ffi.sizeof(MSG)))
        operation = int(msg.kvp_hdr.operation)
        value = msg.body.enumerate.data if operation == lib.KVP_OP_ENUMERATE else msg.body.get
        key = _from_utf16(bytes(value.key), int(value.key_size), lib.KVP_MAX_KEY_SIZE)
        text = _from_utf16(bytes(value.value), int(value.value_size), lib.KVP_MAX_VALUE_SIZE)
        with self._cond:
            self.reply = KvpReply(message.status, key, text)
