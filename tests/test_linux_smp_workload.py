"""Debian's kernel on 4 vCPUs doing work the CPUs must agree on.

* ``mshvtest=flock``: four writers, each pinned to its own CPU with taskset,
  append numbered lines to one file and increment a counter file (a
  read-modify-write), both under an exclusive ``flock`` (util-linux's, from
  Debian: busybox has none); two readers, pinned too, take the lock shared
  and check that the counter equals the file's line count.  The guest prints
  checksums of the result; the host computes them from what the writers must
  have written, and the counter must be the exact total.
* ``mshvtest=reload``: ``rmmod``/``insmod`` of hv_utils and hv_storvsc, round
  after round (each insmod on the next CPU), the disk read and hashed after
  each; at the end the host's shutdown IC reaches the last hv_utils loaded.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from mshvstack.vmm.linuxguest import INIT_PROLOGUE, LOAD_MODULES, GuestUnavailable, busybox_initramfs, debian_program, kernel_modules, module_files

from linuxvm import POWEROFF, LinuxVm, require_debian_guest

VCPUS = 4
MODULES = ("hv_vmbus", "hv_utils", "hv_storvsc", "sd_mod")
WRITERS, READERS, LINES = 4, 2, 100
PAD = "x" * 100   # long lines: a torn append would show in the checksums
RELOADS = 30
DISK_BYTES = 1 << 20   # read whole after each round: 4 MiB cost 1.4 s more a round
BAD = ("Kernel panic", "BUG:", "WARNING:", "Oops", "soft lockup", "rcu_preempt self-detected stall")

# writer.sh W: LINES lines "writer W line NNNN PAD" appended to /tmp/log, and
# /tmp/counter read, incremented and written back, all under one exclusive
# flock per line.  The shell keeps the locked descriptor (fd 9), so flock(1)
# takes the lock for it and closing fd 9 releases it.
WRITER = """#!/bin/sh
w=$1 i=0
while [ $i -lt %(lines)d ]; do
    exec 9>>/tmp/lock
    /usr/bin/flock 9
    read count </tmp/counter
    printf 'writer %%d line %%04d %%s\\n' $w $i %(pad)s >>/tmp/log
    echo $((count + 1)) >/tmp/counter
    exec 9>&-
    i=$((i + 1))
done
echo "MARK writer $w $(cut -d' ' -f39 /proc/$$/stat)"
""" % {"lines": LINES, "pad": PAD}

# reader.sh R: until the writers are done, take the lock shared and compare
# the counter with the log's line count (equal whenever no writer holds it).
READER = """#!/bin/sh
r=$1 checks=0 bad=0
while [ ! -e /tmp/writers_done ]; do
    exec 8</tmp/lock
    /usr/bin/flock -s 8
    read count </tmp/counter
    lines=$(wc -l </tmp/log)
    exec 8<&-
    if [ "$count" != "$lines" ]; then
        bad=$((bad + 1))
        echo "MARK reader_mismatch $r $count $lines"
    fi
    checks=$((checks + 1))
done
echo "MARK reader $r $checks $bad $(cut -d' ' -f39 /proc/$$/stat)"
"""

# Without address-space randomisation: the engine's translations are keyed by
# virtual address, so each randomised exec of flock translated ld.so and libc
# anew (0.4 s an exec here, 0.12 s without).
FLOCK = """echo 0 >/proc/sys/kernel/randomize_va_space
cpus=$(nproc)
echo "MARK cpus $cpus"
echo 0 >/tmp/counter; : >/tmp/log; : >/tmp/lock
writers=
for w in $(seq 0 %(last_writer)d); do
    taskset -c $((w %% cpus)) sh /writer.sh $w &
    writers="$writers $!"
done
for r in $(seq 0 %(last_reader)d); do
    taskset -c $(((2 * r + 1) %% cpus)) sh /reader.sh $r &
done
wait $writers
touch /tmp/writers_done
wait
echo "MARK counter $(cat /tmp/counter)"
echo "MARK lines $(wc -l </tmp/log)"
echo "MARK runs $(cut -d' ' -f2 /tmp/log | uniq | wc -l)"
echo "MARK log_sha256 $(sort /tmp/log | sha256sum | cut -d' ' -f1)"
for w in $(seq 0 %(last_writer)d); do
    echo "MARK writer_sha256 $w $(grep "^writer $w " /tmp/log | sha256sum | cut -d' ' -f1)"
done
""" % {"last_writer": WRITERS - 1, "last_reader": READERS - 1}

# The devices bound to hv_utils are counted by a glob (their names have dashes):
# "ls | grep -c" took 0.5 s a round.
RELOAD = LOAD_MODULES + """cpus=$(nproc)
utilities() { set -- /sys/bus/vmbus/drivers/hv_utils/*-*; [ -e "$1" ] && echo $# || echo 0; }
utils=$(utilities)
n=0; while [ ! -b /dev/sda ] && [ $n -lt 60 ]; do sleep 1; n=$((n + 1)); done
echo "MARK loaded $utils $(dd if=/dev/sda bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)"
i=1
while [ $i -le %(rounds)d ]; do
    rmmod hv_storvsc || echo "MARK rmmod_failed hv_storvsc $i"
    rmmod hv_utils || echo "MARK rmmod_failed hv_utils $i"
    [ -b /dev/sda ] && echo "MARK disk_left $i"
    taskset -c $((i %% cpus)) insmod /lib/modules/hv_utils.ko || echo "MARK insmod_failed hv_utils $i"
    taskset -c $(((i + 1) %% cpus)) insmod /lib/modules/hv_storvsc.ko || echo "MARK insmod_failed hv_storvsc $i"
    n=0; while [ ! -b /dev/sda ] && [ $n -lt 600 ]; do usleep 100000; n=$((n + 1)); done
    utils=$(utilities)
    echo "MARK reload $i $utils $(dd if=/dev/sda bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)"
    i=$((i + 1))
done
echo "MARK reloaded"
while true; do sleep 60; done
""" % {"rounds": RELOADS}

INIT = INIT_PROLOGUE + """exec >/dev/kmsg 2>&1
echo on >/proc/sys/kernel/printk_devkmsg
if grep -q mshvtest=flock /proc/cmdline; then
%(flock)s
    echo "MARK poweroff"
    poweroff -f
fi
%(reload)s""" % {"flock": FLOCK, "reload": RELOAD}



@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    linux = require_debian_guest()
    try:
        files = module_files(kernel_modules(linux, MODULES))
        files.update(debian_program("util-linux", "/usr/bin/flock"))
    except GuestUnavailable as exc:
        pytest.skip(f"Debian's packages are unavailable: {exc}")
    files["writer.sh"] = WRITER.encode()
    files["reader.sh"] = READER.encode()
    files["sbin/poweroff"] = POWEROFF.encode()
    path = tmp_path_factory.mktemp("linux-smp-workload") / "initrd.cpio"
    path.write_bytes(busybox_initramfs(linux.busybox, INIT, files))
    return linux.kernel, path


def _sha256(lines: list[str]) -> str:
    return hashlib.sha256("".join(line + "\n" for line in lines).encode()).hexdigest()


def _clean(log: str) -> None:
    found = [bad for bad in BAD if bad in log]
    assert not found, f"{found}:\n{log[-3000:]}"


def test_writers_on_every_cpu_agree_under_flock(initrd: tuple[Path, Path], tmp_path: Path) -> None:
    kernel, ramdisk = initrd
    vm = LinuxVm(tmp_path, kernel, ramdisk, cmdline="console=ttyS0 mshvtest=flock", vcpus=VCPUS)
    try:
        vm.wait_for("poweroff", timeout=600)
        code, stdout, stderr = vm.finish()
    finally:
        vm.kill()
    assert code == 0, f"{stdout}\n{stderr}"
    assert vm.values("cpus") == [str(VCPUS)]
    # Each process ran where taskset put it (the CPU it last ran on, from /proc/PID/stat).
    writers = dict(value.split() for value in vm.values("writer"))
    assert writers == {str(w): str(w % VCPUS) for w in range(WRITERS)}, writers
    readers = {r: (int(checks), int(bad), cpu) for r, checks, bad, cpu in map(str.split, vm.values("reader"))}
    assert sorted(readers) == [str(r) for r in range(READERS)], readers
    assert all(cpu == str((2 * int(r) + 1) % VCPUS) for r, (_c, _b, cpu) in readers.items()), readers
    assert all(checks > 0 for checks, _b, _c in readers.values()), readers
    assert not vm.values("reader_mismatch"), vm.values("reader_mismatch")[:5]
    # The counter is the exact total: no read-modify-write was lost.
    total = WRITERS * LINES
    assert vm.values("counter") == [str(total)]
    assert vm.values("lines") == [str(total)]
    # The content is what the writers wrote, each writer's lines in its own order ...
    expected = {w: [f"writer {w} line {i:04d} {PAD}" for i in range(LINES)] for w in range(WRITERS)}
    assert vm.values("log_sha256") == [_sha256(sorted(line for lines in expected.values() for line in lines))]
    assert dict(value.split() for value in vm.values("writer_sha256")) == {str(w): _sha256(lines) for w, lines in expected.items()}
    # ... and the writers really ran at once: their lines interleave.
    assert int(vm.values("runs")[0]) > WRITERS, vm.values("runs")
    assert "guest powered off (ACPI S5)" in stdout
    _clean(vm.log)


def test_hv_utils_and_hv_storvsc_reloaded_30_times(initrd: tuple[Path, Path], tmp_path: Path) -> None:
    kernel, ramdisk = initrd
    disk = tmp_path / "disk.img"
    image = os.urandom(DISK_BYTES)
    disk.write_bytes(image)
    digest = hashlib.sha256(image).hexdigest()
    utilities = "4"   # heartbeat, shutdown, time sync, KVP
    vm = LinuxVm(tmp_path, kernel, ramdisk, "--disk", str(disk), cmdline="console=ttyS0 mshvtest=reload", vcpus=VCPUS)
    try:
        assert vm.wait_for("loaded", timeout=400)[0] == f"{utilities} {digest}", vm.log[-3000:]
        vm.wait_for("reloaded", timeout=900)
        # The shutdown IC reaches the hv_utils loaded last.
        code, stdout, stderr = vm.shut_down_through_the_ic()
    finally:
        vm.kill()
    log = vm.log
    assert code == 0, f"{stdout}\n{stderr}"
    for failure in ("insmod_failed", "rmmod_failed", "disk_left"):
        assert not vm.values(failure), (failure, vm.values(failure))
    rounds = [value.split() for value in vm.values("reload")]
    assert [int(r[0]) for r in rounds] == list(range(1, RELOADS + 1)), log[-3000:]
    assert all(r[1:] == [utilities, digest] for r in rounds), [r for r in rounds if r[1:] != [utilities, digest]][:3]
    assert len(re.findall(r"hv_vmbus: registering driver hv_storvsc", log)) == RELOADS + 1
    assert "guest powered off (ACPI S5)" in stdout
    _clean(log)
