"""Hyper-V synthetic timers armed on every VP at once, each firing on its own VP.

VP i enables its SynIC (its own SIMP page), routes SINT 2 + i to vector
0x42 + i, and arms its four timers: 0 periodic in message mode (SINT 2 + i),
1 periodic in direct mode (vector 0x60 + i), 2 one-shot in message mode at an
absolute time, 3 one-shot in direct mode (vector 0x68 + i) through
auto-enable (the count write enables it).  Its first message stays in the
slot (busy) until timer 1 has fired five times; then the guest frees it and
writes EOM, which must bring the messages that waited.  The handlers count
per VP, SINT, timer and vector, so a timer that fires on another VP, twice
or never shows.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mshvstack.abi import lib
from mshvstack.hvcall import HvRegister
from mshvstack.partition import IoPortIntercept, Partition, Vp

from guests import assemble
from smpguest import AP_TO_LONG_MODE, CODE, DATA, GDT, IDT, STACK_SHIFT, STACKS, VP_INDEX_FROM_RSP, Runner, lapic_partition, long_mode_vp, prepare


@pytest.fixture
def part() -> Iterator[Partition]:
    with lapic_partition() as part:
        yield part


SIMP_BASE = 0x200000          # VP i: SIMP page at SIMP_BASE + i * 0x1000
MSGS = DATA                   # u32 at MSGS + 0x100 * vp + 0x10 * sint + 4 * timer
DIRECT = DATA + 0x1000        # u32 at DIRECT + 0x400 * vp + 4 * vector
HOLD = DATA + 0x2000          # u32 per VP: leave messages in the slot
CONFIG3 = DATA + 0x2100       # u32 per VP: timer 3's config once it fired
SPURIOUS = DATA + 0x2200      # u32 per VP: a message vector with no timer message in its slot
DONE = 0x10
SINT_BASE, MESSAGE_VECTOR, PERIODIC_DIRECT_VECTOR, ONESHOT_DIRECT_VECTOR = 2, 0x40, 0x60, 0x68
MAX_VPS = 4
PERIOD_MESSAGE, PERIOD_DIRECT, ONESHOT_MESSAGE, ONESHOT_DIRECT = 20_000, 30_000, 50_000, 40_000   # 100 ns units
WANTED_PERIODIC = 10
TRAMPOLINE_VECTOR = 0x11                 # the APs' trampoline page (the code starts at 0x10000)

STIMER_CONFIG, STIMER_COUNT = int(lib.HV_MSR_STIMER0_CONFIG), int(lib.HV_MSR_STIMER0_COUNT)
ENABLE, PERIODIC = int(lib.HV_STIMER_CONFIG_ENABLE), int(lib.HV_STIMER_CONFIG_PERIODIC)
AUTO_ENABLE, DIRECT_MODE = int(lib.HV_STIMER_CONFIG_AUTO_ENABLE), int(lib.HV_STIMER_CONFIG_DIRECT_MODE)
SINT_SHIFT, VECTOR_SHIFT = int(lib.HV_STIMER_CONFIG_SINTX_SHIFT), int(lib.HV_STIMER_CONFIG_APIC_VECTOR_SHIFT)
SLOT = int(lib.HV_MESSAGE_SIZE)


def _wrmsr(msr: int, value: str) -> str:
    """WRMSR of ``value`` (an immediate or a 64-bit register) to ``msr``."""
    return f"""
    mov {value}, %rax
    mov %rax, %rdx
    shr $32, %rdx
    mov ${msr}, %ecx
    wrmsr
"""


def _timer(n: int, config: str, count: str) -> str:
    """Timer n: the count first (no effect while disabled), then the config (arms it)."""
    return _wrmsr(STIMER_COUNT + 2 * n, count) + _wrmsr(STIMER_CONFIG + 2 * n, config)


# VP 0 starts the APs as firmware does: INIT, then two SIPIs, to all but itself.
START_APS = """
    test %rbx, %rbx
    jnz 1f
    movl $0xC4500, 0x300(%rbp)              /* INIT, all excluding self */
    movl $0xC4600 + TRAMPOLINE_VECTOR, 0x300(%rbp)   /* SIPI */
    movl $0xC4600 + TRAMPOLINE_VECTOR, 0x300(%rbp)   /* the second SIPI */
1:
"""

# The APs' way from real mode at the SIPI's vector to the common code in long mode.
TRAMPOLINE = f"""
.code16
.balign 4096
trampoline:
    cli
    lgdtl %cs:(gdt_pointer - trampoline)
{AP_TO_LONG_MODE}gdt_pointer:
    .word 23
    .long {GDT}
idt_pointer:
    .word 0xFFF
    .quad {IDT}
.code64
ap_long:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    lidt idt_pointer
    mov $1, %eax
    cpuid
    shr $24, %ebx                           /* my index: the initial APIC id */
    lea 1(%rbx), %rsp
    shl ${STACK_SHIFT}, %rsp
    add ${STACKS - 16}, %rsp
    jmp common_start
"""


def _guest(start_aps: bool = False) -> str:
    message_stubs = "".join(f"message_{s}:\n    push %rax\n    mov ${s}, %eax\n    jmp message\n"
                            for s in range(SINT_BASE, SINT_BASE + MAX_VPS))
    direct_stubs = "".join(f"direct_{v}:\n    push %rax\n    mov ${v}, %eax\n    jmp direct\n"
                           for base in (PERIODIC_DIRECT_VECTOR, ONESHOT_DIRECT_VECTOR) for v in range(base, base + MAX_VPS))
    eoi = _wrmsr(int(lib.HV_X64_MSR_EOI), "$0")
    start = START_APS.replace("TRAMPOLINE_VECTOR", str(TRAMPOLINE_VECTOR)) if start_aps else ""
    return f"""
    mov $0xFEE00000, %rbp
    movl $0x1FF, 0xF0(%rbp)
{start}
common_start:
    mov $0xFEE00000, %rbp
    movl $0x1FF, 0xF0(%rbp)
    mov %rbx, %r15                          /* my VP index */
    movl $1, {HOLD}(,%r15,4)
{_wrmsr(int(lib.HV_X64_MSR_GUEST_OS_ID), "$0x8100000000000000")}
    mov %r15, %r8
    shl $12, %r8
    add ${SIMP_BASE | int(lib.HV_SYNIC_SIMP_ENABLE)}, %r8
{_wrmsr(int(lib.HV_X64_MSR_SIMP), "%r8")}
    lea {MESSAGE_VECTOR + SINT_BASE}(%r15), %rax     /* SINT 2 + i -> vector 0x42 + i */
    xor %edx, %edx
    lea {int(lib.HV_X64_MSR_SINT0) + SINT_BASE}(%r15), %rcx
    wrmsr
{_wrmsr(int(lib.HV_X64_MSR_SCONTROL), f"${int(lib.HV_SYNIC_CONTROL_ENABLE)}")}
    lea {SINT_BASE}(%r15), %r9
    shl ${SINT_SHIFT}, %r9                  /* SINT 2 + i in a timer config */
    mov %r9, %r8
    or ${ENABLE | PERIODIC}, %r8
{_timer(0, "%r8", f"${PERIOD_MESSAGE}")}
    lea {PERIODIC_DIRECT_VECTOR}(%r15), %r8
    shl ${VECTOR_SHIFT}, %r8
    or ${ENABLE | PERIODIC | DIRECT_MODE}, %r8
{_timer(1, "%r8", f"${PERIOD_DIRECT}")}
    mov ${int(lib.HV_X64_MSR_TIME_REF_COUNT)}, %ecx
    rdmsr
    shl $32, %rdx
    or %rax, %rdx
    lea {ONESHOT_MESSAGE}(%rdx), %r10       /* one-shot: an absolute expiry */
    lea {ONESHOT_DIRECT}(%rdx), %r11
    mov %r9, %r8
    or ${ENABLE}, %r8
{_timer(2, "%r8", "%r10")}
    lea {ONESHOT_DIRECT_VECTOR}(%r15), %r8
    shl ${VECTOR_SHIFT}, %r8
    or ${AUTO_ENABLE | DIRECT_MODE}, %r8    /* not enabled: the count write enables it */
{_wrmsr(STIMER_CONFIG + 6, "%r8")}
{_wrmsr(STIMER_COUNT + 6, "%r11")}

wait:
    sti
    hlt
    cli
    mov %r15, %rsi
    shl $10, %rsi                           /* DIRECT row */
    mov %r15, %rdi
    shl $8, %rdi                            /* MSGS row */
    lea {SINT_BASE}(%r15), %rax
    shl $4, %rax
    add %rax, %rdi                          /* MSGS row, my SINT */
    lea {PERIODIC_DIRECT_VECTOR}(%r15), %rax
    mov {DIRECT}(%rsi,%rax,4), %r12d        /* periodic direct expiries */
    cmpl $0, {HOLD}(,%r15,4)
    je 1f
    cmp $5, %r12d
    jb wait
    movl $0, {HOLD}(,%r15,4)                /* free the held slot, EOM if a message waits */
    lea {SINT_BASE}(%r15), %rax
    shl $8, %rax
    mov %r15, %rdx
    shl $12, %rdx
    lea {SIMP_BASE}(%rdx,%rax), %rdx
    movl $0, (%rdx)
    mfence
    testb $1, 5(%rdx)
    jz wait
{_wrmsr(int(lib.HV_X64_MSR_EOM), "$0")}
    jmp wait
1:  cmp ${WANTED_PERIODIC}, %r12d
    jb wait
    cmpl ${WANTED_PERIODIC}, {MSGS}(%rdi)   /* timer 0 */
    jb wait
    cmpl $1, {MSGS} + 8(%rdi)               /* timer 2 */
    jb wait
    lea {ONESHOT_DIRECT_VECTOR}(%r15), %rax
    cmpl $1, {DIRECT}(%rsi,%rax,4)          /* timer 3 */
    jb wait
    mov ${STIMER_CONFIG + 6}, %ecx
    rdmsr
    mov %eax, {CONFIG3}(,%r15,4)
{_wrmsr(STIMER_CONFIG, "$0")}
{_wrmsr(STIMER_CONFIG + 2, "$0")}
    out %al, ${DONE}
    sti
2:  hlt
    jmp 2b

{message_stubs}
message:                                    /* EAX = SINT */
    push %rcx
    push %rdx
    push %rsi
    push %rdi
{VP_INDEX_FROM_RSP}
    mov %rdx, %rsi
    shl $12, %rsi
    mov %eax, %ecx
    shl $8, %ecx
    lea {SIMP_BASE}(%rsi,%rcx), %rsi        /* my slot for this SINT */
    cmpl ${int(lib.HVMSG_TIMER_EXPIRED)}, (%rsi)
    je 3f
    lock incl {SPURIOUS}(,%rdx,4)
    jmp 5f
3:  mov 16(%rsi), %ecx                      /* timer index */
    mov %rdx, %rdi
    shl $8, %rdi
    shl $4, %eax
    add %rax, %rdi
    lock incl {MSGS}(%rdi,%rcx,4)
    cmpl $0, {HOLD}(,%rdx,4)
    jne 5f
    movl $0, (%rsi)                         /* free the slot; EOM if another message waits */
    mfence
    testb $1, 5(%rsi)
    jz 5f
{_wrmsr(int(lib.HV_X64_MSR_EOM), "$0")}
5:
{eoi}
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    iretq

{direct_stubs}
direct:                                     /* EAX = vector */
    push %rcx
    push %rdx
{VP_INDEX_FROM_RSP}
    shl $10, %rdx
    lock incl {DIRECT}(%rdx,%rax,4)
{eoi}
    pop %rdx
    pop %rcx
    pop %rax
    iretq
{TRAMPOLINE if start_aps else ""}
"""


@pytest.mark.parametrize("vcpus, start_aps", [(1, False), (2, False), (4, False), (2, True), (4, True)])
def test_synthetic_timers_on_every_vp_fire_on_their_own_vp(part: Partition, tmp_path: Path, vcpus: int,
                                                          start_aps: bool) -> None:
    """``start_aps``: the APs wait for INIT/SIPI, which VP 0 sends (to all but itself)."""
    image, symbols = assemble(_guest(start_aps), tmp_path, origin=CODE)
    if start_aps:
        assert symbols["trampoline"] == TRAMPOLINE_VECTOR << 12
    gates = {MESSAGE_VECTOR + s: symbols[f"message_{s}"] for s in range(SINT_BASE, SINT_BASE + MAX_VPS)}
    gates.update({v: symbols[f"direct_{v}"] for base in (PERIODIC_DIRECT_VECTOR, ONESHOT_DIRECT_VECTOR)
                  for v in range(base, base + MAX_VPS)})
    prepare(part, image, gates)
    done: set[int] = set()
    lock = threading.Lock()

    def on_port(vp: Vp, exit_: IoPortIntercept) -> bool:
        assert exit_.port_number == DONE
        with lock:
            done.add(vp.index)
            return len(done) == vcpus

    vps = [long_mode_vp(part, 0)]
    for index in range(1, vcpus):
        if start_aps:
            vps.append(part.create_vp(index))
            vps[-1].set_registers({HvRegister.INTERNAL_ACTIVITY_STATE: 1})
        else:
            vps.append(long_mode_vp(part, index))
    Runner(vps, on_port, timeout=60).run()
    memory = part.memory
    for vp in range(vcpus):
        sint = SINT_BASE + vp
        messages = {(s, t): n for s in range(16) for t in range(4)
                    if (n := struct.unpack_from("<I", memory.read(MSGS + 0x100 * vp + 0x10 * s + 4 * t, 4))[0])}
        direct = {v: n for v, n in enumerate(struct.unpack("<256I", memory.read(DIRECT + 0x400 * vp, 0x400))) if n}
        assert set(messages) == {(sint, 0), (sint, 2)}, f"VP {vp}: timer messages {messages}"
        assert messages[(sint, 0)] >= WANTED_PERIODIC and messages[(sint, 2)] == 1, f"VP {vp}: {messages}"
        assert set(direct) == {PERIODIC_DIRECT_VECTOR + vp, ONESHOT_DIRECT_VECTOR + vp}, f"VP {vp}: direct {direct}"
        assert direct[ONESHOT_DIRECT_VECTOR + vp] == 1, f"VP {vp}: the one-shot direct timer fired {direct}"
        config3 = struct.unpack("<I", memory.read(CONFIG3 + 4 * vp, 4))[0]
        assert config3 & AUTO_ENABLE and not config3 & ENABLE, f"VP {vp}: timer 3's config after it fired: {config3:#x}"
        assert struct.unpack("<I", memory.read(SPURIOUS + 4 * vp, 4))[0] == 0


# ---- timers armed by the VMM (HvSetVpRegisters) while their VP runs
SPINNER = f"""
    mov $0xFEE00000, %rbp
    movl $0x1FF, 0xF0(%rbp)
    sti
1:  pause                                   /* no exit: only a deadline or a kick stops the engine */
    jmp 1b
tick:
    push %rax
    push %rcx
    push %rdx
{VP_INDEX_FROM_RSP}
    lock incl {DIRECT}(,%rdx,4)
{_wrmsr(int(lib.HV_X64_MSR_EOI), "$0")}
    pop %rdx
    pop %rcx
    pop %rax
    iretq
"""


@pytest.mark.parametrize("vcpus", [1, 2])
def test_a_timer_the_vmm_arms_on_a_running_vp_fires(part: Partition, tmp_path: Path, vcpus: int) -> None:
    """Every VP spins without exits; the VMM then arms each one's timer 0 (periodic, direct)
    through its registers from another thread: the running engine must learn the deadline."""
    import time

    from mshvstack.hvcall import HvRegister as Reg

    image, symbols = assemble(SPINNER, tmp_path, origin=CODE)
    prepare(part, image, {0x70: symbols["tick"]})
    vps = [long_mode_vp(part, index) for index in range(vcpus)]
    runner = Runner(vps, lambda vp, exit_: True, timeout=30)
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        time.sleep(0.3)   # every VP is inside its engine
        for vp in vps:
            vp.set_registers({Reg.STIMER0_COUNT: PERIOD_DIRECT,
                              Reg.STIMER0_CONFIG: ENABLE | PERIODIC | DIRECT_MODE | 0x70 << VECTOR_SHIFT})
        deadline = time.monotonic() + 5
        ticks = [0] * vcpus
        while time.monotonic() < deadline and min(ticks) < WANTED_PERIODIC:
            time.sleep(0.02)
            ticks = [struct.unpack("<I", part.memory.read(DIRECT + 4 * vp, 4))[0] for vp in range(vcpus)]
        assert min(ticks) >= WANTED_PERIODIC, f"timer interrupts per VP: {ticks}"
        for vp in vps:
            vp.set_registers({Reg.STIMER0_CONFIG: 0})
    finally:
        runner.finish()
        thread.join(timeout=30)
