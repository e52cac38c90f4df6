"""The ``mshvstack`` command line (typer): parse, call a lower layer, print."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from mshvstack import info as info_mod

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Userspace VMM for Linux /dev/mshv, with an embedded simulator.")
console = Console()


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")) -> None:
    """Show the host, the ABI binding and which backends can run here."""
    data = info_mod.gather()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(show_header=False, box=None)
    table.add_row("mshvstack", data["mshvstack"])
    table.add_row("python", data["python"])
    table.add_row("kernel", f"{data['kernel']} ({data['machine']})")
    for dev, state in data["devices"].items():
        table.add_row(dev, "present" if state["exists"] else "absent")
    b = data["binding"]
    table.add_row("binding", f"{b['ioctls']} ioctls, {b['structs']} structs, {b['unions']} unions, {b['constants']} constants")
    for name, state in data["backends"].items():
        mark = "[green]usable[/green]" if state["usable"] else "[yellow]unusable[/yellow]"
        table.add_row(f"backend {name}", f"{mark}: {state['reason']}")
    console.print(table)


@app.callback()
def _root() -> None:
    """mshvstack: create partitions, map memory, run VPs on /dev/mshv or its simulator."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
