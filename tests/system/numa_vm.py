"""Boot a Linux VM with several real NUMA nodes and run one command in it (the system tests' harness).

    python tests/system/numa_vm.py --nodes 2 -- numactl -H
    python tests/system/numa_vm.py --install --rwdir /tmp/out -- .venv/bin/python payload.py

The guest is this machine's own Debian/Ubuntu kernel booted by virtme-ng under QEMU, with the
host's root filesystem shared read-only (writes land in a throwaway overlay, except under each
--rwdir), so the same Python, virtualenv and checkout are there at the same paths. The guest has
NODES nodes of CPUS_PER_NODE vCPUs and MEM_PER_NODE of memory each: its kernel, libnuma,
mbind/move_pages and sched_setaffinity are real. QEMU uses KVM when /dev/kvm works (checked by a
short probe boot; some sandboxes expose a /dev/kvm that hangs) and otherwise emulates the CPU
(TCG): everything runs 10-50x slower, Python imports over the shared filesystem included.

Needs: qemu-system-x86_64, a kernel in /boot with its modules, a static busybox (virtme-ng builds
its initramfs with it), kmod, and virtme-ng's `vng` (a test dependency: `pip install -e .[test]`).
`ensure_tools(install=True)` apt-installs the system packages when run as root on Debian/Ubuntu.
The guest's environment is not the host's: pass variables with `env=`.
"""
from __future__ import annotations

import argparse
import glob
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# apt packages for what the VM needs (the kernel package is chosen per distribution)
APT_PACKAGES = {"qemu-system-x86_64": "qemu-system-x86", "depmod": "kmod", "file": "file",
                "numactl": "numactl"}
KERNEL_PACKAGES = ("linux-image-amd64", "linux-image-generic")   # Debian, Ubuntu
# a KVM boot of `true` takes a few seconds; a /dev/kvm that cannot run guests hangs instead
KVM_PROBE_S = 45


@dataclass(frozen=True)
class VMResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    accel: str


def vng_path() -> str | None:
    """virtme-ng's launcher: beside this Python (the test extra installs it) or on PATH."""
    here = Path(sys.executable).parent / "vng"
    return str(here) if here.exists() else shutil.which("vng")


def kernel_path() -> str | None:
    """The newest kernel image in /boot whose modules are installed (virtme loads them)."""
    found = []
    for k in glob.glob("/boot/vmlinuz-*"):
        release = k.split("vmlinuz-", 1)[1]
        if os.path.isdir(f"/lib/modules/{release}") and os.access(k, os.R_OK):
            found.append(k)
    return max(found, key=_version_key, default=None)


def _version_key(path: str) -> list:
    return [int(x) if x.isdigit() else x for x in path.replace("-", ".").split(".")]


def missing_tools() -> list[str]:
    """Apt packages whose programs are absent (empty when the VM can boot as far as tools go)."""
    need = [pkg for prog, pkg in APT_PACKAGES.items() if shutil.which(prog) is None]
    if not _static_busybox():
        need.append("busybox-static")
    if kernel_path() is None:
        need.append(_kernel_package())
    return need


def _static_busybox() -> bool:
    """virtme-ng takes the first busybox it finds and insists that it is statically linked
    (it asks `file`, so do we)."""
    for name in ("busybox-static", "busybox.static", "busybox"):
        path = shutil.which(name) or next((p for d in ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin",
                                                          "/sbin") if os.path.isfile(p := f"{d}/{name}")), None)
        if path:
            if shutil.which("file") is None:
                return False
            out = subprocess.run(["file", "-L", path], capture_output=True, text=True).stdout
            return "statically linked" in out or "static-pie linked" in out
    return False


def _kernel_package() -> str:
    for pkg in KERNEL_PACKAGES:
        r = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True) \
            if shutil.which("apt-cache") else None
        if r is not None and "Candidate:" in r.stdout and "Candidate: (none)" not in r.stdout:
            return pkg
    return KERNEL_PACKAGES[0]


def unavailable_reason(install: bool = False) -> str | None:
    """Why the VM cannot boot here (None: it can). With install=True, first apt-installs what is
    missing when this process is root on an apt system."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the NUMA VM needs Linux on x86_64 (this is {platform.system()} {platform.machine()})"
    if vng_path() is None:
        return "virtme-ng's `vng` is not installed; `pip install -e .[test]` brings it"
    need = missing_tools()
    if need and install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *need]):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                return f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
        need = missing_tools()
    if need:
        cmd = f"apt-get install {' '.join(need)}"
        if os.geteuid() == 0 and shutil.which("apt-get"):
            how = f"`{cmd}`, or let the tests install them (unset NUMALLM_VM_INSTALL=0)"
        else:
            how = f"as root: `{cmd}` (the tests install them themselves when run as root)"
        return f"the NUMA VM needs {', '.join(need)} (Debian/Ubuntu packages); install them {how}"
    return None


def _kvm_usable() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


_accel_cache: dict[str, str] = {}


def choose_accel() -> str:
    """"kvm" when a probe boot under KVM finishes in time, else "tcg". NUMALLM_VM_ACCEL=kvm|tcg
    skips the probe."""
    forced = os.environ.get("NUMALLM_VM_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced
    if "accel" not in _accel_cache:
        ok = False
        if _kvm_usable():
            r = _boot(["true"], nodes=1, cpus_per_node=1, mem_per_node="512M", rwdirs=(), env={},
                      cwd="/", timeout=KVM_PROBE_S, accel="kvm")
            ok = r.returncode == 0
        _accel_cache["accel"] = "kvm" if ok else "tcg"
    return _accel_cache["accel"]


def run(command: list[str], nodes: int = 2, cpus_per_node: int = 1, mem_per_node: str = "2G",
        rwdirs: tuple[str, ...] = (), env: dict[str, str] | None = None, cwd: str | None = None,
        timeout: float = 1800) -> VMResult:
    """Boot the VM, run `command` (argv) in `cwd` with `env` added, return its status and output.
    returncode 124: the VM did not finish within `timeout` seconds."""
    return _boot(command, nodes, cpus_per_node, mem_per_node, rwdirs, env or {}, cwd or os.getcwd(),
                 timeout, choose_accel())


def _split_mem(mem: str) -> tuple[int, str]:
    digits = "".join(c for c in mem if c.isdigit())
    unit = mem[len(digits):] or "M"
    if not digits or unit not in ("M", "G"):
        raise ValueError(f"memory size {mem!r}: give a number with M or G, e.g. 2G")
    return int(digits), unit


def _boot(command, nodes, cpus_per_node, mem_per_node, rwdirs, env, cwd, timeout, accel) -> VMResult:
    per, unit = _split_mem(mem_per_node)
    numa = []
    for n in range(nodes):
        first = n * cpus_per_node
        numa += ["--numa", f"{per}{unit},cpus={first}-{first + cpus_per_node - 1}"]
    inner = " ".join(shlex.quote(a) for a in command)
    if env:
        inner = "env " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " " + inner
    argv = [vng_path(), "--run", kernel_path(), "--cpus", str(nodes * cpus_per_node),
            "--memory", f"{per * nodes}{unit}", *numa,
            *(x for d in rwdirs for x in ("--rwdir", str(d))),
            "--append", "edd=off",                   # skip a BIOS probe that takes seconds under TCG
            "--exec", f"cd {shlex.quote(cwd)} && {inner}"]
    if accel == "tcg":
        argv.insert(1, "--disable-kvm")
    t0 = time.perf_counter()
    # vng runs virtme-run through a shell, which execs QEMU: a grandchild. Its own session lets a
    # timeout kill the whole group (killing vng alone would leave QEMU running).
    path = os.path.dirname(argv[0]) + os.pathsep + os.environ.get("PATH", "")   # virtme-run is beside vng
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, env=dict(os.environ, PATH=path), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = 124
        err += f"\nnuma_vm: the VM did not finish within {timeout:.0f} s"
    finally:
        if proc.poll() is None:          # interrupted (Ctrl-C): take QEMU down too
            os.killpg(proc.pid, signal.SIGKILL)
    # the guest kernel's console lines and QEMU's TCG feature warnings are noise here
    err = "\n".join(x for x in err.splitlines() if not x.startswith("[") and "warning: TCG" not in x)
    return VMResult(rc, out, err, time.perf_counter() - t0, accel)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a command in a VM with real NUMA nodes (see the "
                                            "module docstring).")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--cpus-per-node", type=int, default=1)
    p.add_argument("--mem-per-node", default="2G")
    p.add_argument("--rwdir", action="append", default=[], help="a host folder the guest may write")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--install", action="store_true", help="apt-install missing tools (root)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("give a command after --")
    why = unavailable_reason(install=a.install)
    if why:
        print(f"numa_vm: {why}", file=sys.stderr)
        return 2
    r = run(cmd, a.nodes, a.cpus_per_node, a.mem_per_node, tuple(a.rwdir), timeout=a.timeout)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr + ("\n" if r.stderr else ""))
    print(f"numa_vm: {r.accel}, {r.seconds:.1f} s, exit {r.returncode}", file=sys.stderr)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
