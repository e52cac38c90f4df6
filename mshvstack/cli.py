"""The ``mshvstack`` command line (typer): parse, call a lower layer, print.

Text that is not ours (a guest's panic message, a path, a peer's reply) is
printed as rich ``Text``, never parsed as markup: ``[red]`` in it stays
``[red]``, and ``[/x]`` cannot turn a clear error into a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mshvstack import info as info_mod
from mshvstack.errors import MshvError

if TYPE_CHECKING:
    from mshvstack.vmm.machine import Machine, StopReason

# Plain help (no rich markup): a help text's brackets stay brackets, and flags show no type.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Userspace VMM for Linux /dev/mshv, with an embedded simulator.")
console = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 2) -> None:
    console.print(Text.assemble(("error:", "red"), " ", message), highlight=False)
    raise typer.Exit(code)


def _plain(value: object) -> Text:
    """A table cell or line from data that is not ours (never markup)."""
    return Text(str(value))


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")) -> None:
    """Show the host, the ABI binding and which backends can run here."""
    data = info_mod.gather()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(show_header=False, box=None)
    table.add_row("mshvstack", _plain(data["mshvstack"]))
    table.add_row("python", _plain(data["python"]))
    table.add_row("kernel", _plain(f"{data['kernel']} ({data['machine']})"))
    for dev, state in data["devices"].items():
        table.add_row(_plain(dev), "present" if state["exists"] else "absent")
    b = data["binding"]
    table.add_row("binding", f"{b['ioctls']} ioctls, {b['structs']} structs, {b['unions']} unions, {b['constants']} constants")
    for name, state in data["backends"].items():
        mark = ("usable", "green") if state["usable"] else ("unusable", "yellow")
        table.add_row(_plain(f"backend {name}"), Text.assemble(mark, ": ", str(state["reason"])))
    Console().print(table)


def _console_sink(target: str, as_json: bool) -> tuple[Callable[[bytes], None], Callable[[], None]]:
    if target == "stdio":
        stream = sys.stderr.buffer if as_json else sys.stdout.buffer

        def write(data: bytes) -> None:
            stream.write(data)
            stream.flush()
        return write, lambda: None
    try:
        handle = open(target, "ab", buffering=0)
    except OSError as exc:
        _fail(f"--console {target!r}: {exc.strerror}")
        raise  # unreachable

    def write_file(data: bytes) -> None:
        handle.write(data)
    return write_file, handle.close


def _stats_table(stats: dict[str, dict[str, float]]) -> Table:
    table = Table(title="exits")
    table.add_column("type")
    table.add_column("count", justify="right")
    table.add_column("µs/exit", justify="right")
    table.add_column("total ms", justify="right")
    for kind, s in stats.items():
        table.add_row(_plain(kind), f"{int(s['count'])}", f"{s['us_per_exit']:.1f}", f"{1000 * s['seconds']:.1f}")
    return table


def _nic_table(nics: list[dict[str, Any]]) -> Table:
    table = Table(title="network")
    for column in ("NIC", "MAC", "tx packets", "tx bytes", "tx dropped", "rx packets", "rx bytes", "rx dropped"):
        table.add_column(column, justify="left" if column in ("NIC", "MAC") else "right")
    for nic in nics:
        table.add_row(_plain(nic["id"]), _plain(nic["mac"]), *(str(nic[k]) for k in (
            "tx_packets", "tx_bytes", "tx_dropped", "rx_packets", "rx_bytes", "rx_dropped")))
    return table


def _open_incoming(uri: str, backend: str, disks: tuple[Any, ...] | None) -> tuple[Any, Any]:
    """The configuration and the rest of the stream of ``run --incoming URI`` (``disks``:
    images in place of the recorded ones)."""
    from mshvstack.snapshot import SnapshotError
    from mshvstack.vmm import machinestate
    from mshvstack.vmm.config import ConfigError
    from mshvstack.vmm.migration import FILE_SCHEME, MigrationError, listen_incoming, snapshot_path, socket_address

    try:
        if uri.startswith(FILE_SCHEME):
            path = snapshot_path(uri)
            source: Any = open(path, "rb")   # read while the machine is built from it
        else:
            socket_address(uri)   # a bad URI is refused before anything waits
            console.print(Text(f"waiting for the migration stream on {uri}"))
            source = listen_incoming(uri).makefile("rb")
        reader, config = machinestate.read_config(source, uri, backend, disks)
    except (MigrationError, SnapshotError) as exc:
        raise ConfigError(f"--incoming: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"--incoming {uri}: {exc.strerror}") from None
    return config, reader


@app.command()
def run(
    kernel: Path | None = typer.Argument(None, metavar="KERNEL",
                                         help="Kernel to boot: an ELF (PVH or 64-bit entry) or a Linux bzImage."),
    demo: bool = typer.Option(False, "--demo", metavar="",
                              help="Run a demo guest instead of a KERNEL: --demo [hello|iotest|pioloop|linux] "
                              "(linux: Debian's kernel and its Hyper-V drivers to a shell; fetched with apt-get, then cached)."),
    demo_guest: str = typer.Option("hello", "--demo-guest", metavar="NAME", help="Which built-in guest --demo runs: hello, iotest or pioloop."),
    memory: str = typer.Option("256M", "--memory", metavar="SIZE", help="Guest RAM, e.g. 256M or 1G."),
    vcpus: int = typer.Option(1, "--vcpus", metavar="N", help="Number of virtual processors."),
    cmdline: str = typer.Option("console=ttyS0", "--cmdline", metavar="TEXT", help="Kernel command line (bzImage)."),
    initrd: Path | None = typer.Option(None, "--initrd", metavar="FILE", help="Initial ramdisk."),
    extract: bool = typer.Option(False, "--extract-vmlinux", metavar="",
                                 help="Boot a bzImage's vmlinux (PVH entry) decompressed on the host: much faster on slow engines."),
    backend: str = typer.Option("auto", "--backend", metavar="auto|host|sim", help="auto (real device if present), host or sim."),
    profile: str = typer.Option("newest", "--profile", metavar="NAME", help="Kernel ABI profile for the simulator: newest, 6.15, azure."),
    no_vmbus: bool = typer.Option(False, "--no-vmbus", metavar="", help="Offer no VMBus devices."),
    disk: list[str] = typer.Option([], "--disk", metavar="IMG[,ro]",
                                   help="A raw disk image for the guest's synthetic SCSI controller (repeatable)."),
    net: list[str] = typer.Option([], "--net", metavar="user[,hostfwd=..]|tap=IFNAME",
                                  help="A synthetic NIC (netvsc; repeatable): user = user-mode NAT on libslirp, 10.0.2.0/24 "
                                       "with DHCP and the host's loopback at 10.0.2.2, hostfwd=tcp:[HOSTADDR]:PORT-:GUESTPORT "
                                       "forwards a host port in; tap=IFNAME = an existing TAP device. Options: mac=, id=."),
    api_socket: Path | None = typer.Option(None, "--api-socket", metavar="PATH",
                                           help="Serve QMP (the QEMU Machine Protocol) on this UNIX socket, for `mshvstack ctl` or any QMP client."),
    console_target: str = typer.Option("stdio", "--console", metavar="stdio|FILE",
                                       help="Where the guest's serial console goes. On a terminal the guest gets every key "
                                            "(Ctrl-C included); Ctrl-A x quits, Ctrl-A h lists the keys."),
    show_stats: bool = typer.Option(False, "--stats", metavar="", help="Print a table of exits by type and where the time went."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the run summary as JSON (console goes to stderr)."),
    incoming: str | None = typer.Option(None, "--incoming", metavar="URI",
                                        help="Start from a snapshot (file:PATH) or a live migration (unix:PATH, tcp:HOST:PORT) "
                                             "instead of booting: the machine's configuration comes from it; its disks reopen "
                                             "by their recorded paths unless given again with --disk."),
) -> None:
    """Boot a guest and run it until it stops; the guest's console is live."""
    from mshvstack.vmm.config import DEMO_GUESTS, LINUX_DEMO, ConfigError, DiskSpec, MachineConfig, parse_size
    from mshvstack.vmm.machine import Machine
    from mshvstack.vmm.netconfig import NetSpec
    from mshvstack.vmm.qmp import QmpServer

    linux_demo = None
    if demo and kernel is not None and not kernel.exists() and str(kernel) in (*DEMO_GUESTS, LINUX_DEMO):
        demo_guest, kernel = str(kernel), None   # `--demo NAME`
    if demo and demo_guest == LINUX_DEMO:
        from mshvstack.vmm import linuxdemo
        from mshvstack.vmm.linuxguest import GuestUnavailable

        try:
            linux_demo = linuxdemo.prepare()
        except GuestUnavailable as exc:
            _fail(f"--demo linux: {exc}")
        assert linux_demo is not None
        demo, kernel, initrd, extract = False, linux_demo.kernel, linux_demo.initrd, True
        memory, disk = "512M" if memory == "256M" else memory, [*disk, str(linux_demo.disk)]
    stream = None
    try:
        if incoming is not None:
            if kernel is not None or demo:
                raise ConfigError("--incoming starts the machine saved in the snapshot: give no KERNEL or --demo")
            config, stream = _open_incoming(incoming, backend, tuple(DiskSpec.parse(d) for d in disk) or None)
        elif demo and kernel is not None:
            raise ConfigError("give either a KERNEL file or --demo, not both")
        else:
            config = MachineConfig(kernel=kernel, demo=demo_guest if demo or kernel is None else None, memory=parse_size(memory),
                                   vcpus=vcpus, cmdline=cmdline, initrd=initrd, backend=backend, profile=profile,
                                   extract_vmlinux=extract, vmbus=not no_vmbus,
                                   disks=tuple(DiskSpec.parse(d) for d in disk),
                                   nets=tuple(NetSpec.parse(n) for n in net)).validate()
    except ConfigError as exc:
        _fail(str(exc))
    write, close_console = _console_sink(console_target, as_json)
    server = None
    try:
        machine = Machine(config, console=write, incoming=stream)
        if api_socket is not None:
            try:
                server = QmpServer(machine, api_socket)
            except MshvError:
                machine.close()
                raise
        reason = _run_with_console(machine, stdin=console_target == "stdio")
    except (MshvError, ValueError) as exc:
        close_console()
        _fail(str(exc), 1)
        return
    finally:
        if server is not None:
            server.close()
        if linux_demo is not None:
            linuxdemo.cleanup(linux_demo)
    close_console()
    summary: dict[str, Any] = {**machine.status(), "exit_code": reason.exit_code, "reason": reason.kind.value,
                               "detail": reason.detail, "stats": machine.stats.as_dict(), "engine": machine.engine_time}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        console.print(Text.assemble((str(reason), "bold"), f" after {summary['uptime']:.2f} s on the {summary['backend']} backend, "
                                    f"{summary['exits']} exits"), highlight=False)
        if show_stats:
            console.print(_stats_table(summary["stats"]))
            nics = (summary.get("vmbus") or {}).get("nics") or []
            if nics:
                console.print(_nic_table(nics))
            engine = summary["engine"]
            if engine:
                handled = sum(s["seconds"] for s in summary["stats"].values())
                console.print(f"time: {engine['engine_s']:.1f} s in the engine running guest code (of it "
                              f"{engine['block_scan_s']:.1f} s scanning {int(engine['blocks'])} new blocks in Python; "
                              f"{int(engine.get('blocks_filtered', 0))} more found plain by the core; "
                              f"{int(engine.get('blocks_redone', 0))} translated again, of them "
                              f"{int(engine.get('blocks_redone_alone', 0))} with the other VPs parked), "
                              f"{handled:.1f} s handling exits in the VMM", highlight=False)
    raise typer.Exit(reason.exit_code)


def _run_with_console(machine: Machine, stdin: bool) -> StopReason:
    """Run the machine to its stop with standard input as its console.

    On a terminal: raw mode for the guest, the escape keys for us, and the
    terminal restored however the run ends.  SIGTERM, SIGHUP and SIGINT stop
    the machine cleanly (exit code 128 + the signal's number).
    """
    import signal

    from mshvstack.vmm.console import HELP, HINT, ConsoleInput, EscapeCommand, RawTerminal, StopSignals
    from mshvstack.vmm.machine import ShutdownCause, StopKind, StopReason

    interactive = stdin and os.isatty(0)
    terminal = RawTerminal(0) if interactive else None

    def on_command(command: EscapeCommand) -> None:
        if command is EscapeCommand.QUIT:
            machine.stop(StopReason(StopKind.POWEROFF, 0, "quit from the console (Ctrl-A x)", ShutdownCause.HOST_UI))
        elif command is EscapeCommand.HELP:
            sys.stderr.write("\r\n" + HELP)
            sys.stderr.flush()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        machine.stop(StopReason(StopKind.POWEROFF, 128 + signum, f"stopped by {name}", ShutdownCause.HOST_SIGNAL))

    machine.start()
    try:
        with StopSignals(on_signal, restore=terminal.restore if terminal else lambda: None):
            if terminal is not None:
                console.print(HINT, highlight=False)
                terminal.__enter__()
            if stdin:
                ConsoleInput(0, machine.feed_console, interactive, on_command).start()
            reason = machine.wait()
    finally:
        if terminal is not None:
            terminal.restore()
        machine.close()
    assert reason is not None
    return reason


@app.command()
def ctl(
    socket_path: Path = typer.Argument(..., metavar="SOCKET", help="The machine's --api-socket."),
    command: str = typer.Argument(..., metavar="COMMAND", help="status, pause, resume, shutdown (ask the guest), poweroff, reset, "
                                  "timesync (step the guest clock to the host's), kvp, snapshot PATH or migrate URI."),
    args: list[str] = typer.Argument(None, metavar="ARGS", help="For kvp: get KEY | set KEY VALUE | delete KEY | list [POOL]; "
                                     "for snapshot: the file to write; for migrate: unix:PATH, tcp:HOST:PORT or file:PATH."),
    pool: str = typer.Option("external", "--pool", metavar="POOL", help="KVP pool: external, guest, auto, auto_external."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the raw JSON reply."),
    timeout: float = typer.Option(30.0, "--timeout", metavar="SECONDS", help="Seconds to wait for the machine's answer (all of it)."),
) -> None:
    """Control a running machine through its API socket (each verb is one QMP command)."""
    from mshvstack.vmm.control import VERBS, ControlError, check_timeout, request, status_rows

    if command not in VERBS:
        _fail(f"unknown command {command!r}: one of {', '.join(VERBS)}")
    try:
        check_timeout(timeout)
    except ControlError as exc:
        _fail(str(exc))
    arguments = _kvp_arguments(args or [], pool) if command == "kvp" else {}
    moving = command in ("snapshot", "migrate")
    if moving:
        if len(args or []) != 1:
            _fail(f"usage: mshvstack ctl SOCKET {command} {'PATH' if command == 'snapshot' else 'URI'}")
        arguments = {"path" if command == "snapshot" else "uri": (args or [""])[0]}
    try:
        with _MigrationProgress(enabled=moving and not as_json) as progress:
            reply = request(socket_path, command, arguments, timeout=timeout, progress=progress.update)
        rows = status_rows(reply) if reply.get("ok") and command not in ("kvp", "snapshot", "migrate") else []
    except ControlError as exc:
        _fail(str(exc), 1)
        return
    if as_json:
        typer.echo(json.dumps(reply, indent=2))
    elif not reply.get("ok"):
        _fail(str(reply.get("error")), 1)
    elif command == "kvp":
        for pair in reply.get("pairs", []):
            typer.echo(f"{pair['key']}={pair['value']}")
    elif command == "snapshot":
        Console().print(Text(f"saved {reply['snapshot']}: {reply['bytes'] / 1e6:.1f} MB, the guest paused "
                             f"{reply['downtime_ms']} ms (now postmigrate: resume it, or start it elsewhere with "
                             f"run --incoming file:{reply['snapshot']})"), soft_wrap=True)
    elif command == "migrate":
        Console().print(Text(f"migrated to {arguments['uri']}: {reply['bytes'] / 1e6:.1f} MB in {reply['total_ms']} ms, "
                             f"the guest paused {reply['downtime_ms']} ms (the source is now postmigrate)"), soft_wrap=True)
    else:
        table = Table(show_header=False, box=None)
        for label, text in rows:
            table.add_row(_plain(label), _plain(text))
        Console().print(table)
    if not reply.get("ok"):
        raise typer.Exit(1)


class _MigrationProgress:
    """A progress bar on stderr while a snapshot or migration runs: bytes sent, what is
    left, the dirty rate and the pass (from each query-migrate answer)."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TextColumn("{task.fields[detail]}"), console=Console(stderr=True), transient=True,
                                  disable=not enabled or not sys.stderr.isatty())
        self._task = self._progress.add_task("migrating", total=None, detail="")

    def __enter__(self) -> _MigrationProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def update(self, info: dict[str, Any]) -> None:
        ram: dict[str, Any] = info["ram"] if isinstance(info.get("ram"), dict) else {}
        sent, left = int(ram.get("transferred", 0) or 0), int(ram.get("remaining", 0) or 0)
        detail = f"{left >> 10} KiB left, {ram.get('dirty-pages-rate', 0)} pages/s dirtied, pass {ram.get('dirty-sync-count', 0)}"
        self._progress.update(self._task, completed=sent, total=sent + left if left else None, detail=detail)


def _kvp_arguments(args: list[str], pool: str) -> dict[str, str]:
    shapes = {"get": 1, "set": 2, "delete": 1, "list": 0}
    if not args or args[0] not in shapes:
        _fail("kvp needs one of: get KEY, set KEY VALUE, delete KEY, list")
    operation, rest = args[0], args[1:]
    if operation == "list" and len(rest) == 1:
        pool, rest = rest[0], []
    if len(rest) != shapes[operation]:
        _fail(f"kvp {operation} takes {shapes[operation]} argument(s)")
    return {"operation": operation, "pool": pool, "key": rest[0] if rest else "", "value": rest[1] if len(rest) > 1 else ""}


def _print_version(value: bool) -> None:
    if value:
        from mshvstack import __version__

        typer.echo(f"mshvstack {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
    verbose: int = typer.Option(0, "-v", "--verbose", count=True, help="-v: what the VMM does (INFO); -vv: more detail (DEBUG)."),
    log_file: Path | None = typer.Option(None, "--log-file", help="Write the log to FILE instead of standard error."),
) -> None:
    """mshvstack: create partitions, map memory, run VPs on /dev/mshv or its simulator."""
    import logging

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    try:
        handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    except OSError as exc:
        _fail(f"--log-file {str(log_file)!r}: {exc.strerror}")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
