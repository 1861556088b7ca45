"""`m3dm edge`: the edge role's commands (imported only when `m3dm edge` runs)."""

from __future__ import annotations

import typer

app = typer.Typer(help="edge role.", no_args_is_help=True, add_completion=False)
