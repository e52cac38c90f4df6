"""`mshvstack run --demo linux`: Debian's kernel with its Hyper-V drivers, to a shell.

Fetches the kernel and busybox (progress shown while apt-get downloads;
cached after the first run), builds an initramfs with hv_vmbus, hv_utils
and hv_storvsc, and attaches a scratch disk that the guest sees as
/dev/sda.  `poweroff` in the guest ends the run.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from mshvstack.vmm.linuxguest import (
    BUSYBOX_PACKAGE,
    INIT_PROLOGUE,
    LOAD_MODULES,
    busybox_initramfs,
    cache_dir,
    debian_guest,
    kernel_modules,
    module_files,
    package_record,
    resolve_kernel_package,
)

MODULES = ("hv_vmbus", "hv_utils", "hv_storvsc", "sd_mod")
SCRATCH_DISK_BYTES = 64 << 20

INIT = INIT_PROLOGUE + "export PATH=/sbin:/bin\n" + LOAD_MODULES + """n=0; while [ ! -b /dev/sda ] && [ $n -lt 30 ]; do sleep 1; n=$((n + 1)); done
hostname mshvstack-demo
cat <<'EOF'

  mshvstack: Debian's Linux on the simulated /dev/mshv.
  VMBus devices:  ls /sys/bus/vmbus/devices     scratch disk: /dev/sda
  'poweroff' ends the run.

EOF
while true; do setsid cttyhack sh -l; done
"""

# hv_utils' shutdown runs /sbin/poweroff, and so does the user: power off at once
# (busybox's own poweroff would signal our shell /init).
POWEROFF = "#!/bin/sh\nexec /bin/busybox poweroff -f\n"


@dataclass(frozen=True)
class LinuxDemo:
    kernel: Path
    initrd: Path
    disk: Path


def _download_progress(packages: list[str]) -> tuple[threading.Event, threading.Thread] | None:
    """A rich progress bar following apt-get's downloads into the cache (by file size)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    directory = cache_dir()
    wanted = []
    for package in packages:
        record = package_record(package)
        if not (directory / record.filename).exists():
            wanted.append(record)
    if not wanted:
        return None
    done = threading.Event()

    def follow() -> None:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      transient=True) as progress:
            tasks = {r.filename: progress.add_task(f"fetching {r.package}", total=r.size) for r in wanted}
            while not done.wait(0.2):
                for record in wanted:   # apt-get download writes the .deb in place as it arrives
                    sizes = [p.stat().st_size for p in directory.glob(f"{record.package}_*.deb")]
                    progress.update(tasks[record.filename], completed=max(sizes, default=0))

    thread = threading.Thread(target=follow, name="download-progress", daemon=True)
    thread.start()
    return done, thread


def prepare(workdir: Path | None = None) -> LinuxDemo:
    """Everything the demo boots: raises GuestUnavailable with a one-line reason."""
    progress = _download_progress([resolve_kernel_package(), BUSYBOX_PACKAGE])
    try:
        linux = debian_guest()
    finally:
        if progress is not None:
            progress[0].set()
            progress[1].join()
    files = module_files(kernel_modules(linux, MODULES))
    files["sbin/poweroff"] = POWEROFF.encode()
    # busybox's shell runs its own poweroff applet first; the login shell's profile points it at ours.
    files["etc/profile"] = b"alias poweroff=/sbin/poweroff\nalias halt=/sbin/poweroff\n"
    workdir = workdir or Path(tempfile.mkdtemp(prefix="mshvstack-demo-"))
    initrd = workdir / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(linux.busybox, INIT, files))
    disk = workdir / "scratch.img"
    with disk.open("wb") as f:
        f.truncate(SCRATCH_DISK_BYTES)   # sparse: costs nothing until the guest writes
    return LinuxDemo(linux.kernel, initrd, disk)


def cleanup(demo: LinuxDemo) -> None:
    for path in (demo.initrd, demo.disk):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    try:
        demo.initrd.parent.rmdir()
    except OSError:
        pass

