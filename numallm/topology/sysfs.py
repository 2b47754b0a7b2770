"""Reading Linux sysfs/procfs under a root directory that stands in for `/`.

Every read goes through `Reader`, which turns a missing or unreadable file into None plus a note,
never an exception: a topology with a gap is more useful than a traceback.
"""
from __future__ import annotations

import os
import re

# /proc/cpuinfo flag -> numallm feature name (the names kernels and docs use)
FEATURE_FLAGS = {
    "avx2": "avx2", "fma": "fma", "f16c": "f16c",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
    "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni", "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16", "amx_tile": "amx_tile", "amx_bf16": "amx_bf16",
    "amx_int8": "amx_int8",
}


def parse_cpulist(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11). Also accepts strides '0-6:2' (kernel syntax)."""
    out: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not m:
            raise ValueError(f"bad CPU list element {part!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        step = int(m.group(3)) if m.group(3) else 1
        if hi < lo or step < 1 or hi - lo > 1 << 20:
            raise ValueError(f"bad CPU range {part!r}")
        out.update(range(lo, hi + 1, step))
    return tuple(sorted(out))


def format_cpulist(cpus) -> str:
    """(0, 1, 2, 3, 8) -> '0-3,8' (the inverse of parse_cpulist)."""
    cpus = sorted(set(cpus))
    parts, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)


class Reader:
    """Reads files under `root` (which stands for `/`), collecting notes on what failed."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.notes: list[str] = []
        self._noted: set[str] = set()

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel.lstrip("/"))

    def note(self, text: str) -> None:
        if text not in self._noted:
            self._noted.add(text)
            self.notes.append(text)

    def text(self, rel: str, quiet: bool = False) -> str | None:
        try:
            with open(self.path(rel), encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:  # permission denied, EIO on a broken device...
            if not quiet:
                self.note(f"could not read /{rel.lstrip('/')} ({e.strerror or e}); left out")
            return None

    def line(self, rel: str, quiet: bool = False) -> str | None:
        t = self.text(rel, quiet)
        return None if t is None else t.strip()

    def int(self, rel: str, quiet: bool = False) -> int | None:
        t = self.line(rel, quiet)
        if t is None:
            return None
        try:
            return int(t)
        except ValueError:
            self.note(f"/{rel.lstrip('/')} holds {t[:40]!r}, not a number; left out")
            return None

    def cpulist(self, rel: str, quiet: bool = False) -> tuple[int, ...] | None:
        t = self.line(rel, quiet)
        if t is None:
            return None
        try:
            return parse_cpulist(t)
        except ValueError as e:
            self.note(f"/{rel.lstrip('/')}: {e}; left out")
            return None

    def listdir(self, rel: str) -> list[str]:
        try:
            return os.listdir(self.path(rel))
        except OSError:
            return []


def numbered(names: list[str], prefix: str) -> list[int]:
    """['cpu0', 'cpu12', 'cpufreq'] with prefix 'cpu' -> [0, 12]."""
    out = []
    for n in names:
        rest = n[len(prefix):]
        if n.startswith(prefix) and rest.isdigit():
            out.append(int(rest))
    return sorted(out)


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo or node/nodeN/meminfo -> {key: bytes (kB fields) or count}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"(?:Node \d+ )?([\w()]+):\s+(\d+)(\s*kB)?", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if m.group(3) else 1)
    return out


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as {field: value}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        k, _, v = line.partition(":")
        out.setdefault(k.strip(), v.strip())
    return out


def parse_status(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def selected(text: str | None) -> str | None:
    """'always [madvise] never' -> 'madvise'."""
    if text is None:
        return None
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else text.strip() or None
