"""`m3dm deploy`: the deploy role's commands (imported only when `m3dm deploy` runs)."""

from __future__ import annotations

import typer

app = typer.Typer(help="deploy role.", no_args_is_help=True, add_completion=False)
