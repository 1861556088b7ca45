"""`m3dm keys`: CURVE keypairs (pyzmq certificate format) for stations, the collector and the registry."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="CURVE keypairs for stations, collector and registry.", no_args_is_help=True, add_completion=False
)


@app.command("gen")
def gen(
    out: Annotated[Path, typer.Option(help="Folder to write NAME.key and NAME.key_secret into.")],
    name: Annotated[str, typer.Option(help="Key name, e.g. the station id or 'collector'.")] = "server",
    as_json: Annotated[bool, typer.Option("--json", help="Print the paths and fingerprint as JSON.")] = False,
) -> None:
    """Write a new keypair. Give the .key (public) file to peers; keep .key_secret on this machine."""
    from protocol.curve import fingerprint, generate_keypair, load_public_key

    try:
        public, secret = generate_keypair(out, name)
    except FileExistsError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    info = {"public": str(public), "secret": str(secret), "fingerprint": fingerprint(load_public_key(public))}
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        typer.echo(f"wrote {public} (public, fingerprint {info['fingerprint']}) and {secret} (secret)")


@app.command("show")
def show(key: Annotated[Path, typer.Argument(help="A .key or .key_secret file.")]) -> None:
    """Print a key file's public-key fingerprint."""
    from protocol.curve import fingerprint, load_public_key

    typer.echo(fingerprint(load_public_key(key)))
