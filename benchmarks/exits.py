"""Exit round trips and guest compute speed on the simulated /dev/mshv,
each against bare Unicorn doing the same work, measured in the same run.

    python benchmarks/exits.py [--exits N] [--rounds N] [--loop N]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import time
from collections.abc import Callable

import unicorn
import unicorn.x86_const as ux

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import SimBackend
from mshvstack.backend.sim.engines.unicorn import TCG_BUFFER_SIZE

# Real mode.  IO loop at 0x1000: out 0x10,al ; jmp 0x1000
IO_LOOP = bytes.fromhex("e610ebfc")
# Compute loop at 0x1000: mov ecx,N ; dec ecx ; jnz -4 ; out 0x10,al ; jmp 0x1000.
# Run twice, the first time to translate it (and for the simulator, to start the engine).
def compute_loop(n: int) -> bytes:
    return bytes.fromhex("66b9") + n.to_bytes(4, "little") + bytes.fromhex("664975fce610ebf2")


COMPUTE_OUT = 0x1000 + 10   # the OUT's address


def _sim_guest(code: bytes) -> tuple[SimBackend, int, int, int, mmap.mmap, object]:
    backend = SimBackend()
    dev = backend.open()
    part = backend.ioctl(dev, lib.MSHV_CREATE_PARTITION, ffi.new("struct mshv_create_partition *"))
    backend.ioctl(part, lib.MSHV_INITIALIZE_PARTITION, 0)
    ram = mmap.mmap(-1, 0x10000)
    ram[0x1000 : 0x1000 + len(code)] = code
    region = ffi.new("struct mshv_user_mem_region *")
    region.size, region.userspace_addr = len(ram), int(ffi.cast("uintptr_t", ffi.from_buffer(ram)))
    region.flags = (1 << lib.MSHV_SET_MEM_BIT_WRITABLE) | (1 << lib.MSHV_SET_MEM_BIT_EXECUTABLE)
    backend.ioctl(part, lib.MSHV_SET_GUEST_MEMORY, region)
    vp = backend.ioctl(part, lib.MSHV_CREATE_VP, ffi.new("struct mshv_create_vp *"))
    page = ffi.from_buffer("struct hv_vp_register_page *", backend.mmap(vp, 4096, 0))
    # CS at 0 (the VP starts at the reset vector, CS base 0xFFFF0000), RIP and RFLAGS, by hypercall.
    raw = ffi.new("char[]", ffi.sizeof("struct hv_input_set_vp_registers") + 3 * ffi.sizeof("struct hv_register_assoc"))
    inp = ffi.cast("struct hv_input_set_vp_registers *", raw)
    inp.elements[0].name, inp.elements[0].value.reg64 = lib.HV_X64_REGISTER_RIP, 0x1000
    inp.elements[1].name, inp.elements[1].value.reg64 = lib.HV_X64_REGISTER_RFLAGS, 2
    cs = inp.elements[2]
    cs.name = lib.HV_X64_REGISTER_CS
    cs.value.segment.base, cs.value.segment.limit, cs.value.segment.selector, cs.value.segment.attributes = 0, 0xFFFF, 0, 0x9B
    call = ffi.new("struct mshv_root_hvcall *")
    call.code, call.reps, call.in_sz, call.in_ptr = lib.HVCALL_SET_VP_REGISTERS, 3, len(ffi.buffer(raw)), int(ffi.cast("uintptr_t", raw))
    backend.ioctl(vp, lib.MSHV_ROOT_HVCALL, call)
    return backend, dev, part, vp, ram, page


def sim_exit_loop(stack: contextlib.ExitStack) -> Callable[[int], float]:
    """The raw loop: MSHV_RUN_VP, skip the OUT through the register page, run again."""
    backend, _dev, _part, vp, ram, page = _sim_guest(IO_LOOP)
    stack.callback(ram.close)   # the guest's RAM lives as long as the loop (the engine maps its address)
    run = ffi.new("struct mshv_run_vp *")
    msg = ffi.cast("struct hv_message *", run)
    io = ffi.cast("struct hv_x64_io_port_intercept_message *", ffi.addressof(msg.u))
    dirty_ip = 1 << lib.HV_X64_REGISTER_CLASS_IP
    backend.ioctl(vp, lib.MSHV_RUN_VP, run)  # warm up (translation)
    assert msg.header.message_type == lib.HVMSG_X64_IO_PORT_INTERCEPT and io.port_number == 0x10, "not the IO loop"

    def loop(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            page.rip = io.header.rip + io.header.instruction_length  # emulate: skip the OUT
            page.dirty = dirty_ip
            backend.ioctl(vp, lib.MSHV_RUN_VP, run)
        return time.perf_counter() - start
    return loop


def api_exit_loop(stack: contextlib.ExitStack, backend_free: bool = False) -> Callable[[int], float]:
    """The loop a user writes with the public API: run, a typed IoPortIntercept, set RIP.
    ``backend_free``: the ioctl returns at once with the last message in place, so what
    is timed is only the stack above the backend (what a user pays on real /dev/mshv)."""
    from mshvstack.hvcall import HvRegister
    from mshvstack.partition import IoPortIntercept, Mshv, PartitionConfig, Segment

    mshv = stack.enter_context(Mshv.open("sim"))
    part = stack.enter_context(mshv.create_partition(PartitionConfig()))
    part.initialize()
    part.map_memory(0, 0x10000)
    part.memory.write(0x1000, IO_LOOP)
    vp = part.create_vp(0)
    sregs = vp.sregs
    sregs.cs = Segment(base=0, limit=0xFFFF, selector=0, attributes=0x9B)
    vp.sregs = sregs
    vp.set_registers({HvRegister.RIP: 0x1000, HvRegister.RFLAGS: 2})
    first = vp.run()
    assert isinstance(first, IoPortIntercept) and first.port_number == 0x10, first
    backend = part.backend
    if backend_free:
        backend.ioctl = lambda fd, request, arg: 0   # type: ignore[method-assign,assignment]
        stack.callback(delattr, backend, "ioctl")   # the class's own again
    last = [first]

    def loop(n: int) -> float:
        exit_ = last[0]
        start = time.perf_counter()
        for _ in range(n):
            vp.set_registers({HvRegister.RIP: exit_.header.next_rip})
            exit_ = vp.run()   # type: ignore[assignment]   # the IO loop: checked after the loop
        elapsed = time.perf_counter() - start
        assert isinstance(exit_, IoPortIntercept)
        last[0] = exit_
        return elapsed
    return loop


def _bare(code: bytes) -> tuple[unicorn.Uc, mmap.mmap]:
    """Bare Unicorn at its best: its translation buffer sized as the engine's, so that
    the generated code stays within a direct call of the library whatever else is mapped."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_16)
    uc.ctl_set_tcg_buffer_size(TCG_BUFFER_SIZE)
    ram = mmap.mmap(-1, 0x10000)
    ram[0x1000 : 0x1000 + len(code)] = code
    uc.mem_map_ptr(0, len(ram), unicorn.UC_PROT_ALL, ctypes.addressof(ctypes.c_char.from_buffer(ram)))
    return uc, ram


def bare_exit_loop(stack: contextlib.ExitStack) -> Callable[[int], float]:
    """The same exact-instruction exit on Unicorn alone: code hook, stop, skip, restart."""
    uc, ram = _bare(IO_LOOP)
    stack.callback(ram.close)

    def on_out(uc: unicorn.Uc, address: int, size: int, _d: object) -> None:
        uc.reg_write(ux.UC_X86_REG_EIP, address)
        uc.emu_stop()

    uc.hook_add(unicorn.UC_HOOK_CODE, on_out, None, 0x1000, 0x1000)
    uc.emu_start(0x1000, 0x10000)

    def loop(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            uc.emu_start(uc.reg_read(ux.UC_X86_REG_EIP) + 2, 0x10000)
        return time.perf_counter() - start
    return loop


def best_rates(loops: dict[str, Callable[[int], float]], exits: int, rounds: int) -> dict[str, float]:
    """Exits per second of each loop at its best round; the loops take turns, so a
    slow spell of this (shared, virtual) machine falls on all of them alike."""
    best = dict.fromkeys(loops, float("inf"))
    for _ in range(rounds):
        for name, loop in loops.items():
            best[name] = min(best[name], loop(exits))
    return {name: exits / elapsed for name, elapsed in best.items()}


def sim_compute_rate(n: int) -> float:
    backend, _dev, _part, vp, _ram, page = _sim_guest(compute_loop(n))
    run = ffi.new("struct mshv_run_vp *")
    msg = ffi.cast("struct hv_message *", run)
    io = ffi.cast("struct hv_x64_io_port_intercept_message *", ffi.addressof(msg.u))
    backend.ioctl(vp, lib.MSHV_RUN_VP, run)   # warm up: the engine starts, the loop is translated
    assert msg.header.message_type == lib.HVMSG_X64_IO_PORT_INTERCEPT and io.header.rip == COMPUTE_OUT
    page.rip = io.header.rip + io.header.instruction_length
    page.dirty = 1 << lib.HV_X64_REGISTER_CLASS_IP
    start = time.perf_counter()
    backend.ioctl(vp, lib.MSHV_RUN_VP, run)
    elapsed = time.perf_counter() - start
    assert msg.header.message_type == lib.HVMSG_X64_IO_PORT_INTERCEPT and io.header.rip == COMPUTE_OUT, \
        "the loop did not run to its OUT"
    return 2 * n / elapsed


def bare_compute_rate(n: int) -> float:
    uc, _ram = _bare(compute_loop(n))
    uc.emu_start(0x1000, COMPUTE_OUT)   # warm up: translate
    start = time.perf_counter()
    uc.emu_start(0x1000, COMPUTE_OUT)   # stop at the OUT
    elapsed = time.perf_counter() - start
    assert uc.reg_read(ux.UC_X86_REG_EIP) == COMPUTE_OUT
    return 2 * n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exits", type=int, default=4000, help="exits per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--loop", type=int, default=20_000_000)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        rates = best_rates({"bare": bare_exit_loop(stack), "sim": sim_exit_loop(stack), "api": api_exit_loop(stack),
                            "above": api_exit_loop(stack, backend_free=True)}, args.exits, args.rounds)
    sim_ips = bare_ips = 0.0
    for _ in range(3):   # taking turns too, each at its best
        sim_ips, bare_ips = max(sim_ips, sim_compute_rate(args.loop)), max(bare_ips, bare_compute_rate(args.loop))
    bare, sim, api = rates["bare"], rates["sim"], rates["api"]
    print(f"IO exit round trips, public API (Vp.run, IoPortIntercept, set_registers): {api:,.0f}/s, "
          f"bare Unicorn {bare:,.0f}/s, ratio {api / bare:.3f}")
    print(f"IO exit round trips, raw ioctls + register page: simulator {sim:,.0f}/s, ratio {sim / bare:.3f}")
    print(f"stack above the backend: {1e6 / rates['above']:.1f} us per exit (the public API loop with an ioctl "
          "that returns at once)")
    print(f"guest compute:       simulator {sim_ips / 1e6:,.1f} M insn/s, bare Unicorn {bare_ips / 1e6:,.1f} M insn/s, ratio {sim_ips / bare_ips:.3f}")
    print(f"(exit rates: the best of {args.rounds} interleaved rounds of {args.exits:,} exits each; compute: of 3)")


if __name__ == "__main__":
    main()
