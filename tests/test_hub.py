"""Model references and downloads, against a local imitation of the Hugging Face hub.

Nothing here touches the internet: a stdlib HTTP server on 127.0.0.1 answers the requests
huggingface_hub makes (model info listing, HEAD/GET on /resolve/), and every download runs in a
subprocess whose HF_ENDPOINT points at it and whose HF_HOME is a temporary folder
(huggingface_hub reads both at import time).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from numallm.errors import ModelNotFoundError
from numallm.gguf_file import GGUFFile
from numallm.hub import HubRef, parse_ref, pick_gguf, resolve_model, split_parts

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "tiny/stories-GGUF"
MULTI = "tiny/multi-GGUF"


def _gguf_bytes(name: str) -> bytes:
    """A minimal valid GGUF v3: no tensors, two string keys (one names the variant)."""
    def s(text: str) -> bytes:
        b = text.encode()
        return struct.pack("<Q", len(b)) + b

    kv = [("general.architecture", "llama"), ("general.name", name)]
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv))
    for key, val in kv:
        out += s(key) + struct.pack("<I", 8) + s(val)
    return out


def _split_part_bytes(no: int, count: int) -> bytes:
    """Part `no` of a `count`-part split model without tensors: the first part carries the model's
    keys, the others only gguf-split's split.* keys."""
    def s(text: str) -> bytes:
        b = text.encode()
        return struct.pack("<Q", len(b)) + b

    kv = ([s("general.architecture") + struct.pack("<I", 8) + s("llama"),
           s("general.name") + struct.pack("<I", 8) + s("split")] if no == 0 else [])
    kv += [s("split.no") + struct.pack("<IH", 2, no), s("split.count") + struct.pack("<IH", 2, count),
           s("split.tensors.count") + struct.pack("<Ii", 5, 0)]
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + b"".join(kv)


SPLIT = "tiny/split-GGUF"
FILES = {
    SPLIT: {f"big-Q4_K_M-{i:05d}-of-00003.gguf": _split_part_bytes(i - 1, 3) for i in (1, 2, 3)},
    REPO: {"stories.Q8_0.gguf": _gguf_bytes("q8"), "README.md": b"# tiny\n"},
    MULTI: {"m.Q8_0.gguf": _gguf_bytes("q8"), "m.Q4_K_M.gguf": _gguf_bytes("q4km"),
            "m.Q4_K_S.gguf": _gguf_bytes("q4ks"), "mmproj-m-f16.gguf": _gguf_bytes("proj")},
}


class _Hub(BaseHTTPRequestHandler):
    log: list[tuple[str, str]]  # (method, path) of every request, set on the server's subclass

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _route(self) -> None:
        self.log.append((self.command, self.path))
        path = self.path.split("?")[0]
        parts = path.strip("/").split("/")
        repo = "/".join(parts[2:4] if parts[:2] == ["api", "models"] else parts[:2])
        if repo == "gated/repo":
            return self._send(401, b"{}", {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
        if repo == "broken/repo":
            return self._send(500, b"{}")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            if repo not in FILES:
                return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"})
            info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in FILES[repo]]}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            if repo not in FILES:
                return self._send(404, b"", {"X-Error-Code": "RepoNotFound"})
            data = FILES[repo].get(name)
            if data is None:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            etag = '"' + hashlib.sha256(data).hexdigest() + '"'
            return self._send(200, data, {"ETag": etag, "X-Repo-Commit": COMMIT,
                                          "Content-Type": "application/octet-stream"})
        self._send(404)

    do_GET = do_HEAD = _route


@pytest.fixture()
def hub():
    log: list[tuple[str, str]] = []
    handler = type("Hub", (_Hub,), {"log": log})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, log
    server.shutdown()
    server.server_close()


def _env(tmp_path: Path, endpoint: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", **extra)
    env.pop("NUMALLM_DEBUG", None)
    return env


def _numallm(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "numallm", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def _resolve(env: dict, ref: str, download: bool = True) -> subprocess.CompletedProcess:
    code = ("import sys; from numallm.cli import report; from numallm.errors import NumallmError\n"
            "from numallm.hub import resolve_model\n"
            "try: print(resolve_model(sys.argv[1], download=sys.argv[2] == '1'))\n"
            "except NumallmError as e: sys.exit(report(e))\n")
    return subprocess.run([sys.executable, "-c", code, ref, "1" if download else "0"], env=env,
                          capture_output=True, text=True, timeout=120)


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def _dead_endpoint() -> str:
    # A port that was just free: connections are refused.
    s = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    port = s.server_address[1]
    s.server_close()
    return f"http://127.0.0.1:{port}"


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("numallm: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


# -- references, no network ------------------------------------------------------------------------

def test_parse_ref(tmp_path, monkeypatch):
    assert parse_ref("owner/repo") == HubRef("owner/repo")
    assert parse_ref("owner/repo:Q8_0") == HubRef("owner/repo", quant="Q8_0")
    assert parse_ref("owner/repo:dir/f.gguf") == HubRef("owner/repo", filename="dir/f.gguf")
    for local in ["models/x.gguf", "./a/b", "/abs/a", "a/b/c.gguf", "x.gguf", "~/m.gguf"]:
        assert parse_ref(local) is None, local
    existing = tmp_path / "own" / "repo"
    existing.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # "own/repo" now exists relative to the cwd, so it is a path
    assert parse_ref("own/repo") is None


def test_pick_gguf_rules():
    files = list(FILES[MULTI]) + ["README.md"]
    assert pick_gguf(HubRef(MULTI), files) == "m.Q4_K_M.gguf"
    assert pick_gguf(HubRef(MULTI, quant="q4_k_s"), files) == "m.Q4_K_S.gguf"
    assert pick_gguf(HubRef(REPO), list(FILES[REPO])) == "stories.Q8_0.gguf"  # the only one
    assert pick_gguf(HubRef(MULTI, quant="Q4_K"), ["a.Q4_K.gguf", "a.Q4_K_M.gguf"]) == "a.Q4_K.gguf"
    with pytest.raises(ModelNotFoundError, match=r"none is Q4_K_M: a.Q5_0.gguf, a.Q8_0.gguf"):
        pick_gguf(HubRef(MULTI), ["a.Q8_0.gguf", "a.Q5_0.gguf"])
    with pytest.raises(ModelNotFoundError, match="has no .gguf file"):
        pick_gguf(HubRef(MULTI), ["README.md"])
    with pytest.raises(ModelNotFoundError, match="no file nope.gguf; its GGUF files: m.Q4_K_M.gguf"):
        pick_gguf(HubRef(MULTI, filename="nope.gguf"), files)
    split = ["big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf", "a.Q8_0.gguf"]
    assert pick_gguf(HubRef(MULTI), split) == split[0]          # a split model counts once
    assert split_parts(split[1]) == split[:2] and split_parts("a.gguf") == ["a.gguf"]


def test_pull_fetches_every_part_of_a_split_model(hub, tmp_path):
    server, log = hub
    env = _env(tmp_path, _url(server))
    proc = _numallm(env, "pull", SPLIT)
    assert proc.returncode == 0, proc.stderr
    first = Path(proc.stdout.strip().splitlines()[-1])
    assert first.name == "big-Q4_K_M-00001-of-00003.gguf"
    for name in FILES[SPLIT]:
        assert ("GET", f"/{SPLIT}/resolve/main/{name}") in log
        assert (first.parent / name).read_bytes() == FILES[SPLIT][name]
    f = GGUFFile(first)                                          # reads the parts beside it
    assert len(f.parts) == 3 and f.metadata["general.name"] == "split"
    log.clear()
    again = _resolve(env, f"{SPLIT}:big-Q4_K_M-00002-of-00003.gguf")   # any part: the first one
    assert again.returncode == 0 and again.stdout.strip() == str(first) and log == []
    (first.parent / "big-Q4_K_M-00003-of-00003.gguf").unlink()    # a part gone from the cache
    nope = _resolve(env, SPLIT, download=False)
    _assert_one_line_error(nope, "big-Q4_K_M-00003-of-00003.gguf is not downloaded")


def test_local_paths(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(_gguf_bytes("local"))
    assert resolve_model(str(f)) == str(f)
    with pytest.raises(ModelNotFoundError, match="no such model file") as ei:
        resolve_model(str(tmp_path / "missing.gguf"))
    assert "\n" not in str(ei.value)
    with pytest.raises(ModelNotFoundError, match="is a directory"):
        resolve_model(str(tmp_path))


# -- against the local hub -------------------------------------------------------------------------

def test_pull_downloads_then_resolve_uses_cache(hub, tmp_path):
    server, log = hub
    env = _env(tmp_path, _url(server))
    ref = f"{REPO}:stories.Q8_0.gguf"
    # huggingface_hub hides its bar when stderr is not a terminal; TQDM_POSITION=-1 forces it.
    proc = _numallm(dict(env, TQDM_POSITION="-1"), "pull", ref)
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.read_bytes() == FILES[REPO]["stories.Q8_0.gguf"]
    assert str(path).startswith(str(tmp_path / "hf"))
    assert GGUFFile(path).metadata["general.name"] == "q8"
    assert ("GET", f"/{REPO}/resolve/main/stories.Q8_0.gguf") in log
    assert "100%" in proc.stderr  # huggingface_hub's progress bar

    log.clear()
    again = _resolve(env, ref)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(path)
    assert log == []  # cached: no request at all

    # pull asks the hub again but does not download an unchanged file
    proc = _numallm(env, "pull", ref)
    assert proc.returncode == 0 and proc.stdout.strip() == str(path)
    assert not any(m == "GET" and "/resolve/" in p for m, p in log)


def test_repo_without_file_picks_q4_k_m(hub, tmp_path):
    server, log = hub
    env = _env(tmp_path, _url(server))
    proc = _resolve(env, MULTI)
    assert proc.returncode == 0, proc.stderr
    assert GGUFFile(proc.stdout.strip()).metadata["general.name"] == "q4km"
    assert any(p.startswith(f"/api/models/{MULTI}") for _, p in log)

    proc = _resolve(env, f"{MULTI}:Q4_K_S")
    assert proc.returncode == 0, proc.stderr
    assert GGUFFile(proc.stdout.strip()).metadata["general.name"] == "q4ks"


def test_hub_errors_are_one_line(hub, tmp_path):
    server, _ = hub
    env = _env(tmp_path, _url(server))
    _assert_one_line_error(_numallm(env, "pull", "gated/repo:m.gguf"), "gated/repo is gated", "HF_TOKEN")
    _assert_one_line_error(_numallm(env, "pull", "broken/repo"), "the hub answered HTTP 500")
    _assert_one_line_error(_numallm(env, "pull", f"{MULTI}:Q5_0"), "no Q5_0 file", "m.Q8_0.gguf")
    _assert_one_line_error(_numallm(env, "pull", "nobody/nothing"), "no Hugging Face repo nobody/nothing")
    _assert_one_line_error(_numallm(env, "pull", f"{REPO}:other.gguf"), "has no file other.gguf")


def test_server_down_gives_one_line_error(tmp_path):
    env = _env(tmp_path, _dead_endpoint())
    _assert_one_line_error(_numallm(env, "pull", f"{REPO}:stories.Q8_0.gguf"),
                           f"cannot download {REPO}:stories.Q8_0.gguf", "give a local file")
    _assert_one_line_error(_resolve(env, REPO), f"cannot download {REPO}", "give a local file")


def test_offline_mode(hub, tmp_path):
    server, log = hub
    ref = f"{REPO}:stories.Q8_0.gguf"
    offline = _env(tmp_path, _url(server), HF_HUB_OFFLINE="1")
    _assert_one_line_error(_numallm(offline, "pull", ref), "offline (HF_HUB_OFFLINE is set)")
    _assert_one_line_error(_resolve(offline, REPO), "offline (HF_HUB_OFFLINE is set)")
    assert log == []

    assert _numallm(_env(tmp_path, _url(server)), "pull", ref).returncode == 0
    log.clear()
    for proc in (_resolve(offline, ref), _resolve(offline, REPO), _numallm(offline, "pull", ref)):
        assert proc.returncode == 0, proc.stderr
        assert Path(proc.stdout.strip()).read_bytes() == FILES[REPO]["stories.Q8_0.gguf"]
    assert log == []


def test_download_false_never_downloads(hub, tmp_path):
    server, log = hub
    env = _env(tmp_path, _url(server))
    _assert_one_line_error(_resolve(env, f"{REPO}:stories.Q8_0.gguf", download=False),
                           "is not downloaded; run: numallm pull")
    assert log == []
