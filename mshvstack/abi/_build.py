"""cffi API-mode builder: derive the binding from the headers in include/.

Nothing here restates a declaration.  The C preprocessor flattens the
headers into plain declarations (cffi's cdef cannot expand macros), every
integer ``#define`` is declared to cffi as ``#define NAME ...`` so the C
compiler computes its value (ioctl numbers included), and the extension is
compiled against the very same headers, so cffi checks sizes and offsets of
every struct against the compiler's layout.

Run by setup.py (``cffi_modules``) during ``pip install``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import cffi

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = ROOT / "include"
HEADERS = ("uapi/linux/mshv.h", "hyperv/hyperv.h", "vmbus/vmbus.h", "vmbus/storvsp.h", "x86/xsave.h", "mshvstack/snapshot.h",
           "vmbus/netvsc.h", "vmbus/rndis.h", "net/tun.h")

# Types the kernel's <linux/types.h> provides; declared to cffi as plain
# integer typedefs (the compiler checks them against the real ones).
_TYPE_PRELUDE = """
typedef unsigned char      __u8;
typedef signed char        __s8;
typedef unsigned short     __u16;
typedef signed short       __s16;
typedef unsigned int       __u32;
typedef signed int         __s32;
typedef unsigned long long __u64;
typedef signed long long   __s64;
"""

# Stand-ins used only while flattening declarations: the real headers are
# used for compilation.
_STUB_TYPES = "/* declared by the cffi prelude */\n"
_STUB_IOCTL = "/* ioctl macros only appear in #defines */\n"

_GLUE_CDEF = """
static const char MSHVSTACK_IOCTL_NAMES[];
int mshvstack_ioctl(int fd, unsigned long request, uintptr_t arg);
long mshvstack_self_copy(uintptr_t remote, const void *local, size_t size, int write);
uint8_t mshvstack_fetch_or_u8(uint8_t *address, uint8_t mask);
int memcmp(const void *, const void *, size_t);
"""
_GLUE_SOURCE = """
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>
static int mshvstack_ioctl(int fd, unsigned long request, uintptr_t arg)
{
	return ioctl(fd, request, arg);
}

/* The simulated hypervisor sets a bit in guest memory that the guest clears
 * concurrently with locked instructions: a locked OR, so neither loses the
 * other's update.  Returns the byte as it was. */
static uint8_t mshvstack_fetch_or_u8(uint8_t *address, uint8_t mask)
{
	return __atomic_fetch_or(address, mask, __ATOMIC_SEQ_CST);
}

/* A pipe through which small copies pass: the kernel's own copy_from_user
 * (write) and copy_to_user (read) check the caller's side, at a third of
 * the cost of process_vm_writev.  One per process (reset in a fork child). */
static pthread_mutex_t copy_lock = PTHREAD_MUTEX_INITIALIZER;   /* the pipe, one copy at a time (a leaf) */
static int copy_pipe[2] = {-1, -1};
static int copy_pipe_state;   /* 0 untried, 1 open, -1 unavailable */

static void copy_pipe_forget(void)
{
	if (copy_pipe_state == 1) {
		close(copy_pipe[0]);
		close(copy_pipe[1]);
	}
	copy_pipe[0] = copy_pipe[1] = -1;
	copy_pipe_state = 0;
}

static long pipe_copy(uintptr_t remote, const void *local, size_t size, int write_to_remote)
{
	char drain[PIPE_BUF];
	long result;
	if (copy_pipe_state == 0) {
		copy_pipe_state = pipe2(copy_pipe, O_CLOEXEC | O_NONBLOCK) == 0 ? 1 : -1;
		if (copy_pipe_state == 1)
			pthread_atfork(NULL, NULL, copy_pipe_forget);
	}
	if (copy_pipe_state != 1)
		return -ENOSYS;
	ssize_t in = write(copy_pipe[1], write_to_remote ? local : (const void *)remote, size);
	if (in < 0)
		return -errno;   /* EFAULT: the caller's buffer cannot be read */
	ssize_t out = read(copy_pipe[0], write_to_remote ? (void *)remote : (void *)local, (size_t)in);
	result = out < 0 ? -errno : (long)out;
	if (out != in)   /* EFAULT while copying out: the bytes stay in the pipe */
		while (read(copy_pipe[0], drain, sizeof drain) > 0)
			;
	return in < (ssize_t)size && result >= 0 ? (long)in : result;
}

/* The simulator's copy_{from,to}_user on this process's own memory, so a bad
 * address is an errno, not a SIGSEGV.  Returns the bytes copied, or -errno. */
static long mshvstack_self_copy(uintptr_t remote, const void *local, size_t size, int write_to_remote)
{
	if (size <= PIPE_BUF) {
		pthread_mutex_lock(&copy_lock);
		long done = pipe_copy(remote, local, size, write_to_remote);
		pthread_mutex_unlock(&copy_lock);
		if (done != -ENOSYS)
			return done;
	}
	struct iovec mine = {(void *)local, size}, theirs = {(void *)remote, size};
	ssize_t done = write_to_remote ? process_vm_writev(getpid(), &mine, 1, &theirs, 1, 0)
		: process_vm_readv(getpid(), &mine, 1, &theirs, 1, 0);
	return done < 0 ? -errno : (long)done;
}
"""

_DEFINE = re.compile(r"^\s*#\s*define\s+([A-Za-z_][A-Za-z0-9_]*)(\(?)\s*(.*)$")
_IOCTL_MACRO = re.compile(r"\b_IO(?:W|R|WR)?\s*\(")
_PACKED = "__attribute__((packed))"


def header_files() -> list[Path]:
    """Every header under include/, in a stable order."""
    return sorted(INCLUDE.rglob("*.h"))


def integer_macros() -> tuple[list[str], list[str]]:
    """Names of all object-like macros with a value, and which are ioctls."""
    names: list[str] = []
    ioctls: list[str] = []
    for path in header_files():
        for line in path.read_text().splitlines():
            match = _DEFINE.match(line)
            if not match or match.group(2) or not match.group(3).strip() or "__attribute__" in match.group(3):
                continue  # function-like macro, include guard or attribute shorthand
            name, value = match.group(1), match.group(3)
            if name.startswith("_") or name in names:
                continue
            names.append(name)
            if _IOCTL_MACRO.search(value):
                ioctls.append(name)
    return names, ioctls


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def flattened_declarations() -> str:
    """The headers' declarations with macros expanded and directives removed."""
    with tempfile.TemporaryDirectory() as tmp:
        stubs = Path(tmp) / "linux"
        stubs.mkdir()
        (stubs / "types.h").write_text(_STUB_TYPES)
        (stubs / "ioctl.h").write_text(_STUB_IOCTL)
        wrapper = Path(tmp) / "all.h"
        wrapper.write_text("".join(f'#include "{h}"\n' for h in HEADERS))
        cmd = _compiler()[:1] + ["-E", "-P", "-nostdinc", f"-I{tmp}", f"-I{INCLUDE}", str(wrapper)]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def split_top_level(source: str) -> list[str]:
    """Split C source into top-level declarations (at ';' outside braces)."""
    decls: list[str] = []
    depth = 0
    start = 0
    for index, char in enumerate(source):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == ";" and depth == 0:
            decl = source[start : index + 1].strip()
            if decl != ";":
                decls.append(decl)
            start = index + 1
    return decls


def cdef_parts() -> tuple[str, str, list[str], list[str]]:
    """(natural-layout declarations, packed declarations, macros, ioctls)."""
    natural: list[str] = []
    packed: list[str] = []
    for decl in split_top_level(flattened_declarations()):
        if _PACKED in decl:
            packed.append(decl.replace(_PACKED, ""))
        else:
            natural.append(decl)
    macros, ioctls = integer_macros()
    return "\n".join(natural), "\n".join(packed), macros, ioctls


def build_ffi() -> cffi.FFI:
    natural, packed, macros, ioctls = cdef_parts()
    ffi = cffi.FFI()
    ffi.cdef(_TYPE_PRELUDE)
    ffi.cdef(natural)
    if packed:
        ffi.cdef(packed, packed=True)
    ffi.cdef("\n".join(f"#define {name} ..." for name in macros))
    # The ioctl macro names, so Python can name a request without parsing C,
    # and the ioctl(2) call itself: fcntl.ioctl cannot pass a 64-bit pointer
    # as an integer argument, and cffi releases the GIL while MSHV_RUN_VP blocks.
    ffi.cdef(_GLUE_CDEF)
    includes = "".join(f'#include "{h}"\n' for h in HEADERS)
    ffi.set_source(
        "mshvstack.abi._mshv",
        includes + _GLUE_SOURCE + f'static const char MSHVSTACK_IOCTL_NAMES[] = "{" ".join(ioctls)}";\n',
        include_dirs=[str(INCLUDE)],
    )
    return ffi


ffibuilder = build_ffi()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
