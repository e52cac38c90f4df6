"""VPs of one partition running in parallel, each on its own host thread, must
behave as the CPUs of one x86 machine: every locked read-modify-write atomic
against every other VP, and x86-TSO ordering (no store-load reordering across
MFENCE or a locked instruction)."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mshvstack.partition import IoPortIntercept, Mshv, Partition, Segment, Vp
from mshvstack.partition.registers import TableRegister

from guests import assemble

RAM = 2 << 20
CODE, GDT, PML4, PDPT, PD = 0x10000, 0x1000, 0x2000, 0x3000, 0x4000
DATA = 0x20000          # shared variables, one per 64-byte line
RESULTS = 0x100000      # per-VP result arrays
DONE_PORT = 0x10


def _line(n: int) -> int:
    return DATA + 64 * n


@pytest.fixture
def partition() -> Iterator[Partition]:
    with Mshv.open() as mshv, mshv.create_partition() as part:
        part.initialize()
        part.map_memory(gpa=0, size=RAM)
        memory = part.memory
        memory.write(PML4, struct.pack("<Q", PDPT | 3))
        memory.write(PDPT, struct.pack("<Q", PD | 3))
        memory.write(PD, struct.pack("<Q", 0x83))   # 0-2 MiB, one large page
        memory.write(GDT, struct.pack("<QQQ", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF))
        yield part


def _start_vps(part: Partition, image: bytes, count: int) -> list[Vp]:
    """``count`` VPs in long mode at CODE, each with its index in RBX and its own stack."""
    part.memory.write(CODE, image)
    vps = []
    for index in range(count):
        vp = part.create_vp(index)
        sregs = vp.sregs
        sregs.cs = Segment(base=0, limit=0xFFFFFFFF, selector=0x08, attributes=0xA09B)
        for name in ("ds", "es", "ss"):
            setattr(sregs, name, Segment(base=0, limit=0xFFFFFFFF, selector=0x10, attributes=0xC093))
        sregs.gdt = TableRegister(base=GDT, limit=23)
        sregs.cr3, sregs.cr4, sregs.efer, sregs.cr0 = PML4, 1 << 5, (1 << 8) | (1 << 10), 0x80000011
        vp.sregs = sregs
        regs = vp.regs
        regs.rip, regs.rflags, regs.rbx, regs.rsp = CODE, 2, index, 0x80000 + 0x1000 * index
        vp.regs = regs
        vps.append(vp)
    return vps


def _run_all(vps: list[Vp]) -> None:
    """Run every VP on its own thread until it reports DONE_PORT."""
    errors: list[BaseException] = []

    def run(vp: Vp) -> None:
        try:
            while True:
                exit = vp.run()
                if isinstance(exit, IoPortIntercept) and exit.port_number == DONE_PORT:
                    return
                raise AssertionError(f"VP {vp.index}: unexpected exit {exit}")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(vp,)) for vp in vps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
        assert not thread.is_alive(), "a VP did not finish"
    if errors:
        raise errors[0]


def _u32(part: Partition, gpa: int) -> int:
    return int(struct.unpack("<I", part.memory.read(gpa, 4))[0])


def _u64(part: Partition, gpa: int) -> int:
    return int(struct.unpack("<Q", part.memory.read(gpa, 8))[0])


LOOPS = 200_000

_COUNTERS = f"""
    mov ${LOOPS}, %ecx
1:  lock incl {_line(0)}
    lock addl $3, {_line(1)}
    mov $1, %eax
    lock xaddl %eax, {_line(2)}
    lock decl {_line(3)}
    lock subq $5, {_line(4)}
    mov $1, %eax
    xchg %eax, {_line(5)}            /* a spinlock taken with XCHG ... */
    test %eax, %eax
    jz 3f
2:  pause
    mov $1, %eax
    xchg %eax, {_line(5)}
    test %eax, %eax
    jnz 2b
3:  incl {_line(6)}                  /* ... guards a plain increment */
    movl $0, {_line(5)}              /* released with a plain store */
    mov {_line(7)}, %eax             /* a CMPXCHG loop */
4:  lea 1(%rax), %edx
    lock cmpxchgl %edx, {_line(7)}
    jnz 4b
    mov {_line(8)}, %rax             /* CMPXCHG8B on a 64-bit counter */
    mov {_line(8)} + 4, %edx
    mov %eax, %eax
5:  mov %eax, %esi
    mov %edx, %edi
    mov %eax, %ebx
    add $1, %ebx
    mov %edx, %r9d
    adc $0, %r9d
    push %rcx
    mov %r9d, %ecx
    lock cmpxchg8b {_line(8)}
    pop %rcx
    jnz 5b
    mov {_line(11)}, %rax            /* CMPXCHG16B on a 128-bit counter (its carry crosses words) */
    mov {_line(11)} + 8, %rdx
6:  mov %rax, %rbx
    mov %rdx, %r9
    add $1, %rbx
    adc $0, %r9
    push %rcx
    mov %r9, %rcx
    lock cmpxchg16b {_line(11)}
    pop %rcx
    jnz 6b
    lock btsl $3, {_line(9)}         /* bit operations on a shared word */
    lock btrl $3, {_line(9)}
    lock orl $0x10000, {_line(10)}
    lock andl $0xFFFEFFFF, {_line(10)}
    dec %ecx
    jnz 1b
    out %al, ${DONE_PORT}
    hlt
"""


@pytest.mark.parametrize("vcpus", [2, 4])
def test_locked_read_modify_writes_are_atomic_between_vps(partition: Partition, tmp_path: Path, vcpus: int) -> None:
    image, _ = assemble(_COUNTERS, tmp_path, origin=CODE)
    wide_start = (1 << 64) - LOOPS   # the 128-bit counter's low word overflows halfway
    partition.memory.write(_line(11), wide_start.to_bytes(16, "little"))
    _run_all(_start_vps(partition, image, vcpus))
    total = LOOPS * vcpus
    assert _u32(partition, _line(0)) == total                     # lock inc
    assert _u32(partition, _line(1)) == 3 * total                 # lock add
    assert _u32(partition, _line(2)) == total                     # lock xadd
    assert _u32(partition, _line(3)) == (-total) & 0xFFFFFFFF     # lock dec
    assert _u64(partition, _line(4)) == (-5 * total) & (2**64 - 1)  # lock sub (64-bit)
    assert _u32(partition, _line(5)) == 0                         # the XCHG lock is free
    assert _u32(partition, _line(6)) == total                     # the increment it guards
    assert _u32(partition, _line(7)) == total                     # lock cmpxchg loop
    assert _u64(partition, _line(8)) == total                     # lock cmpxchg8b loop
    assert int.from_bytes(partition.memory.read(_line(11), 16), "little") == wide_start + total   # lock cmpxchg16b
    assert _u32(partition, _line(9)) == 0 and _u32(partition, _line(10)) == 0


TICKETS = 20_000

_TICKETS = f"""
    mov ${TICKETS}, %ecx
1:  mov $1, %eax
    lock xaddl %eax, {_line(0)}      /* a ticket */
    incb {RESULTS}(%rax)             /* only its holder touches this byte */
    dec %ecx
    jnz 1b
    out %al, ${DONE_PORT}
    hlt
"""


@pytest.mark.parametrize("vcpus", [2, 4])
def test_xadd_tickets_are_unique(partition: Partition, tmp_path: Path, vcpus: int) -> None:
    image, _ = assemble(_TICKETS, tmp_path, origin=CODE)
    _run_all(_start_vps(partition, image, vcpus))
    taken = partition.memory.read(RESULTS, TICKETS * vcpus)
    assert _u32(partition, _line(0)) == TICKETS * vcpus
    assert set(taken) == {1}, f"{sum(1 for b in taken if b != 1)} tickets given twice or never"


MISALIGNED_LOOPS = 3_000

_MISALIGNED = f"""
    mov ${MISALIGNED_LOOPS}, %ecx
1:  lock incl {_line(0) + 62}        /* crosses a cache line: no host atomic does it */
    lock addw $1, {_line(3) + 1}     /* misaligned within the line */
    dec %ecx
    jnz 1b
    out %al, ${DONE_PORT}
    hlt
"""


def test_locked_instructions_no_host_atomic_can_do_are_atomic(partition: Partition, tmp_path: Path) -> None:
    """Misaligned locked instructions run while every other VP is parked."""
    image, _ = assemble(_MISALIGNED, tmp_path, origin=CODE)
    _run_all(_start_vps(partition, image, 4))
    assert _u32(partition, _line(0) + 62) == 4 * MISALIGNED_LOOPS
    assert struct.unpack("<H", partition.memory.read(_line(3) + 1, 2))[0] == 4 * MISALIGNED_LOOPS


ROUNDS = 20_000


def _store_buffering(fence: str) -> str:
    """Store buffering (SB): VP 0 writes x then reads y, VP 1 writes y then reads x.
    Each round starts at a barrier; each VP records what it read."""
    return f"""
    mov $1, %ecx                      /* the round */
    lea {_line(1)}(,%rbx,8), %rsi     /* my variable: x (VP 0) or y (VP 1) */
    mov %rbx, %rdi
    xor $1, %rdi
    lea {_line(1)}(,%rdi,8), %rdi     /* the other one */
    mov %rbx, %r8
    shl $18, %r8
    add ${RESULTS}, %r8               /* my results */
1:  lock incl {_line(0)}              /* barrier: both VPs arrived at this round */
    lea (%rcx,%rcx), %edx
2:  cmp {_line(0)}, %edx
    ja 2b
    mov %ecx, (%rsi)                  /* store this round's number */
    {fence}
    mov (%rdi), %eax                  /* load the other's */
    mov %eax, (%r8,%rcx,4)
    inc %ecx
    cmp ${ROUNDS}, %ecx
    jbe 1b
    out %al, ${DONE_PORT}
    hlt
"""


@pytest.mark.parametrize("fence", ["mfence", "lock orl $0, (%rsp)", "xchg %edx, (%rsp)"])
def test_store_buffering_is_forbidden_across_a_fence(partition: Partition, tmp_path: Path, fence: str) -> None:
    """x86-TSO forbids both VPs reading the other's old value once a full barrier
    separates each store from the following load."""
    image, _ = assemble(_store_buffering(fence), tmp_path, origin=CODE)
    _run_all(_start_vps(partition, image, 2))
    seen = [struct.unpack_from(f"<{ROUNDS + 1}I", partition.memory.read(RESULTS + (vp << 18), 4 * (ROUNDS + 1)))
            for vp in (0, 1)]
    both_old = [r for r in range(1, ROUNDS + 1) if seen[0][r] < r and seen[1][r] < r]
    assert not both_old, f"{len(both_old)} rounds read both old values (first: {both_old[:5]})"
    assert all(seen[0][r] <= r and seen[1][r] <= r for r in range(1, ROUNDS + 1)), "a value from the future"


PATCH = 0x30000          # the code VP 0 rewrites, on a page of its own
PATCH_ROUNDS = 300
FLAG = _line(20)         # the version VP 0 published last
READY = _line(21)        # + 8 * VP: the rounds it ran


def _patching(vcpus: int) -> str:
    """VP 0 rewrites the function at PATCH (`mov $version, %eax; ret`) once every
    other VP has run the previous version and said so; each of them records
    what the function returned in each round."""
    wait_for_runners = "\n".join(f"""
2:  cmp {READY + 8 * runner}, %ecx       /* VP {runner} ran the version before */
    jne 2b""" for runner in range(1, vcpus))
    return f"""
    test %rbx, %rbx
    jnz 5f
    mov $1, %ecx                      /* VP 0 writes versions 1.. */
1:  {wait_for_runners}
    movb $0xB8, {PATCH}               /* mov $version, %eax */
    mov %ecx, {PATCH + 1}
    movb $0xC3, {PATCH + 5}           /* ret */
    mov %ecx, {FLAG}                  /* published: the code first, then the flag */
    inc %ecx
    cmp ${PATCH_ROUNDS}, %ecx
    jb 1b
    jmp 9f
5:  mov %rbx, %r8                     /* the others run them */
    shl $16, %r8
    add ${RESULTS}, %r8
    xor %ecx, %ecx
6:  cmp {FLAG}, %ecx                  /* wait for version ecx */
    jne 6b
    call {PATCH}
    mov %eax, (%r8,%rcx,4)
    inc %ecx
    mov %ecx, {READY}(,%rbx,8)
    cmp ${PATCH_ROUNDS}, %ecx
    jb 6b
9:  out %al, ${DONE_PORT}
    hlt
"""


@pytest.mark.parametrize("vcpus", [2, 4])
def test_code_rewritten_by_another_vp_runs_as_rewritten(partition: Partition, tmp_path: Path, vcpus: int) -> None:
    """A VP never runs its translation of code another VP has overwritten since
    (each VP has its own translations: the writer's stores must reach them)."""
    partition.memory.write(PATCH, b"\xB8" + bytes(4) + b"\xC3")   # version 0
    image, _ = assemble(_patching(vcpus), tmp_path, origin=CODE)
    _run_all(_start_vps(partition, image, vcpus))
    for vp in range(1, vcpus):
        seen = struct.unpack_from(f"<{PATCH_ROUNDS}I", partition.memory.read(RESULTS + (vp << 16), 4 * PATCH_ROUNDS))
        stale = [(version, got) for version, got in enumerate(seen) if got != version]
        assert not stale, f"VP {vp} ran old code in {len(stale)} rounds (round, version run): {stale[:5]}"


def test_code_rewritten_by_the_host_runs_as_rewritten(partition: Partition, tmp_path: Path) -> None:
    """The VMM rewrites code through the partition's memory while the VP runs it
    (and never stops: no run boundary where the old bytes could be compared)."""
    memory = partition.memory
    memory.write(PATCH, b"\xB8" + bytes(4) + b"\xC3")   # version 0
    image, _ = assemble(_patching(2).replace("test %rbx, %rbx\n    jnz 5f", "jmp 5f"), tmp_path, origin=CODE)
    vp = _start_vps(partition, image, 2)[1]   # VP 1 runs; VP 0 (the guest writer) never does
    runner = threading.Thread(target=_run_all, args=([vp],))
    runner.start()
    try:
        for version in range(1, PATCH_ROUNDS):
            deadline = time.monotonic() + 30
            while _u32(partition, READY + 8) != version:
                assert runner.is_alive() and time.monotonic() < deadline, "the VP stopped waiting for the next version"
            memory.write(PATCH + 1, struct.pack("<I", version))
            memory.write(FLAG, struct.pack("<I", version))
    finally:
        runner.join(timeout=60)
    assert not runner.is_alive()
    seen = struct.unpack_from(f"<{PATCH_ROUNDS}I", memory.read(RESULTS + (1 << 16), 4 * PATCH_ROUNDS))
    stale = [(version, got) for version, got in enumerate(seen) if got != version]
    assert not stale, f"the VP ran old code in {len(stale)} rounds (round, version run): {stale[:5]}"


FRESH = 0x180000         # pages that become code while VP 0 stores to them
FRESH_PAGES = 48
FRESH_CALLS = 64
CURRENT, WRITING, STALE, BUSY = _line(22), _line(23), _line(24), _line(25)

_FIRST_RUN_WHILE_STORED_TO = f"""
    cmp $1, %rbx
    je 5f
    ja 3f
1:  mov {CURRENT}, %rax               /* VP 0: the page VP 1 is on (-1: done) */
    cmp $-1, %rax
    je 9f
    mov %rax, %rdx
    shl $12, %rax
    incl {FRESH + 1}(%rax)            /* the immediate of its `mov $imm, %eax` */
    mov %rdx, {WRITING}               /* it stores to that page now */
    jmp 1b
3:  lock incl {BUSY}                  /* VPs 2..: busy beside them (each new page parks them) */
    cmpq $-1, {CURRENT}
    jne 3b
    jmp 9f
5:  xor %ecx, %ecx                    /* VP 1: each page in turn */
6:  mov %rcx, {CURRENT}
7:  cmp {WRITING}, %rcx               /* until VP 0 stores to it (before any VP ran code there) */
    jne 7b
    mov %rcx, %r8
    shl $12, %r8
    add ${FRESH}, %r8
    mov ${FRESH_CALLS}, %r10d
8:  mov 1(%r8), %r11d                 /* the immediate as stored now ... */
    mov %cr3, %rax                    /* (serializing, as x86 asks of cross-modified code) */
    mov %rax, %cr3
    call *%r8                         /* ... and as run next: never older */
    cmp %r11d, %eax
    jae 2f
    incl {STALE}
2:  dec %r10d
    jnz 8b
    inc %ecx
    cmp ${FRESH_PAGES}, %ecx
    jb 6b
    movq $-1, {CURRENT}
9:  out %al, ${DONE_PORT}
    hlt
"""


@pytest.mark.parametrize("vcpus", [2, 4])
def test_code_stored_to_before_another_vp_first_runs_it(partition: Partition, tmp_path: Path, vcpus: int) -> None:
    """Code another VP first runs on a page the writer has been storing to all
    along (stores a VP made before the page held code take no code check):
    the runner never runs bytes older than those it read before it serialized."""
    for page in range(FRESH_PAGES):
        partition.memory.write(FRESH + (page << 12), b"\xB8" + bytes(4) + b"\xC3")   # mov $0, %eax; ret
    partition.memory.write(CURRENT, struct.pack("<q", -2))
    partition.memory.write(WRITING, struct.pack("<q", -3))
    image, _ = assemble(_FIRST_RUN_WHILE_STORED_TO, tmp_path, origin=CODE)
    _run_all(_start_vps(partition, image, vcpus))
    written = [_u32(partition, FRESH + (page << 12) + 1) for page in range(FRESH_PAGES)]
    assert min(written) > 0, "VP 0 did not store to every page"
    assert _u32(partition, STALE) == 0, f"VP 1 ran code older than it had read {_u32(partition, STALE)} times"
