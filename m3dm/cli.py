"""`m3dm`: one command for every role, each role's CLI imported only when its command runs.

A station installs only the `edge` extra (no torch, no scikit-learn), so `m3dm edge run` must never
import `trainer`. The table below names each command's module by string; `m3dm --help` is printed from
the table, so listing commands imports no role at all. Each role's module holds a Typer app.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, sub-command or None, short help). A sub-command picks one command out of a role's
# Typer app (the trainer's top-level commands); None means the role's whole app is the command.
COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "synth": ("trainer.cli", "synth", "Generate a structured-light data set (MVTec 3D-AD layout)."),
    "data": ("trainer.cli", "data", "Inspect data sets in the MVTec 3D-AD layout."),
    "train": ("trainer.cli", "train", "Fit banks, UFF, DLF and thresholds for classes."),
    "eval": ("trainer.cli", "eval", "Five-variant evaluation of models or a bundle."),
    "export": ("trainer.cli", "export", "ONNX export (and TensorRT engines) with parity."),
    "bundle": ("trainer.cli", "bundle", "Signed model bundles: keys, build, verify, inspect."),
    "demo": ("trainer.cli", "demo", "The whole local fleet on generated data, end to end."),
    "edge": ("edge.cli", None, "The station: score frames in real time, stream results."),
    "collector": ("collector.cli", None, "The fleet's defect log: ingest, query, dashboard."),
    "deploy": ("deploy.cli", None, "Registry and rollouts of bundles to the fleet."),
    "keys": ("m3dm.keys", None, "CURVE keypairs for stations, collector and registry."),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "Usage: m3dm COMMAND [ARGS]...",
        "",
        "  M3DM-Fleet: multimodal (RGB + 3D) industrial anomaly detection.",
        "  `m3dm COMMAND --help` describes each command.",
        "",
        "Commands:",
    ]
    lines += [f"  {name.ljust(width)}  {spec[2]}" for name, spec in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Dispatch `m3dm COMMAND ...` to the role module that owns COMMAND (exit 2 for an unknown one)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        raise SystemExit(0 if args else 2)
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"error: no such command {name!r}\n\n{usage()}")
        raise SystemExit(2)
    module_name, sub, _ = COMMANDS[name]
    app = importlib.import_module(module_name).app
    if sub is None:
        app(args=rest, prog_name=f"m3dm {name}")
    else:
        app(args=[sub, *rest], prog_name="m3dm")
