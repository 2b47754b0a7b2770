"""Command line: `numallm VERB ...` (also `python -m numallm`).

Each verb lives in its own module exposing `register(subparsers)`, which adds a parser whose
`func(args) -> int` runs it. Errors reach the user as one line (see errors.report).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import report

# verb modules, in the order `numallm --help` lists them
COMMANDS = ["numallm.commands.chat", "numallm.commands.run", "numallm.commands.info",
            "numallm.commands.pull", "numallm.commands.kernels",
            "numallm.commands.topo", "numallm.commands.plan", "numallm.commands.bench",
            "numallm.commands.serve"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="numallm", description="NUMA-aware CPU inference for GGUF models")
    p.add_argument("--version", action="version", version=f"numallm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # verb not built yet
        mod.register(sub)
    return p


class _Stderr(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        print(f"numallm: {record.getMessage()}", file=sys.stderr)   # sys.stderr of the moment


def _show_notices() -> None:
    """Library notices (the "numallm" logger) as "numallm: ..." lines on stderr."""
    log = logging.getLogger("numallm")
    if not log.handlers:
        handler = _Stderr()
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def main(argv: list[str] | None = None) -> int:
    _show_notices()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - the one place errors become a message
        return report(exc)


if __name__ == "__main__":
    raise SystemExit(main())
