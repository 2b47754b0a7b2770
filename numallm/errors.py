"""User-facing errors: one line saying what is wrong and what to do.

Every error a user can cause (bad file, bad flag, not enough memory...) is raised as a
NumallmError subclass. The CLI prints its message on one line and exits non-zero; the traceback is
shown only when NUMALLM_DEBUG=1.
"""
from __future__ import annotations

import os
import sys


class NumallmError(Exception):
    """An error whose message is meant for the user (what, where, what to do)."""

    exit_code = 1


class GGUFError(NumallmError):
    """The GGUF file is truncated, corrupt, hostile or uses something we do not support."""


class UnsupportedError(NumallmError):
    """A valid model that uses an architecture or feature numallm does not implement."""


class ContextOverflowError(NumallmError):
    """The prompt (plus requested tokens) does not fit in the context window."""


class ModelNotFoundError(NumallmError):
    """A model path or hub reference that cannot be resolved."""


class OptionError(NumallmError, ValueError):
    """An option (library keyword or CLI flag) outside its allowed range; the message names the
    option, the value given and the range. A ValueError too, so library callers can catch either."""

    exit_code = 2   # a usage error, like argparse's


class GrammarError(NumallmError, ValueError):
    """A response format or JSON schema the grammar library cannot compile (HTTP 400), or
    structured output asked for without the grammar library installed."""


def debug_enabled() -> bool:
    return os.environ.get("NUMALLM_DEBUG", "") not in ("", "0")


def _kernel_choice(exc: BaseException) -> bool:
    """A bad NUMALLM_KERNEL value (numallm_kernels cannot import numallm's errors); looked up only
    if the kernels were loaded at all."""
    cal = sys.modules.get("numallm_kernels._calibrate")
    return cal is not None and isinstance(exc, cal.KernelChoiceError)


def describe(exc: BaseException, prog: str = "numallm") -> tuple[str, int]:
    """The one line a user sees for `exc` and the exit code (the CLI prints it: cli.report)."""
    msg = str(exc).strip().replace("\n", " ") or exc.__class__.__name__
    if isinstance(exc, NumallmError):
        return f"{prog}: error: {msg}", exc.exit_code
    if _kernel_choice(exc):
        return f"{prog}: error: {msg}", 1
    if isinstance(exc, OSError) and exc.filename is not None:   # a file the user named
        return f"{prog}: error: {exc.filename}: {exc.strerror or msg}", 1
    if isinstance(exc, MemoryError):
        return f"{prog}: error: not enough memory ({msg}); use a smaller model or context (-c)", 1
    return (f"{prog}: internal error: {exc.__class__.__name__}: {msg} "
            f"(set NUMALLM_DEBUG=1 for a traceback and report it)", 70)
