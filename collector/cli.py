"""`m3dm collector`: the collector role's commands (imported only when `m3dm collector` runs)."""

from __future__ import annotations

import typer

app = typer.Typer(help="collector role.", no_args_is_help=True, add_completion=False)
