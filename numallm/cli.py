"""Command line: `numallm VERB ...` (also `python -m numallm`).

Each verb lives in its own module exposing `register(subparsers)`, which adds a parser whose
`func(args) -> int` runs it. Errors reach the user as one line (report, errors.describe).
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

from .commands.common import check_args
from .errors import NumallmError, debug_enabled, describe

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


# errors of writing the output (a full disk or /dev/full, a closed pipe, a vanished terminal)
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EBADF, errno.EDQUOT, errno.EFBIG}


def report(exc: BaseException, prog: str = "numallm") -> int:
    """Print one line for `exc` (traceback only under NUMALLM_DEBUG=1); return the exit code."""
    if debug_enabled():
        import traceback

        traceback.print_exception(exc)
    line, code = describe(exc, prog)
    print(line, file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    _show_notices()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if sys.stdout is None:   # started with fd 1 closed (`>&-`)
            raise NumallmError("standard output is closed; redirect it to a file or /dev/null")
        if os.environ.get("NUMALLM_KERNEL", "").strip():   # a typo is refused, not ignored
            from numallm_kernels._calibrate import check_spec

            check_spec()
        for note in check_args(args):
            print(f"numallm: {note}", file=sys.stderr)
        rc = int(args.func(args) or 0)
        sys.stdout.flush()   # here, so a failing write is reported like any other error
        return rc
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRNOS or exc.filename is not None:
            return report(exc)
        _drop_stdout()
        if exc.errno == errno.EPIPE:   # the reader left (`| head`): quiet, as a SIGPIPE death is
            return 128 + 13
        print(f"numallm: error: cannot write the output ({exc.strerror or exc}); check where "
              f"standard output goes (a full disk, a closed file)", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the one place errors become a message
        return report(exc)


def _drop_stdout() -> None:
    """Point fd 1 at /dev/null, so the interpreter's final flush of what is still buffered
    neither fails again nor prints a second message."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    raise SystemExit(main())
