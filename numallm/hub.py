"""MODEL arguments: a local GGUF path, or a Hugging Face reference fetched into the HF cache.

Reference forms (the hub part follows llama.cpp's `-hf`):
    path/to/model.gguf          a local file (anything that exists, contains a path separator
                                beyond `owner/repo`, or ends in .gguf)
    owner/repo                  the repo's only GGUF, else its Q4_K_M one
    owner/repo:Q8_0             the GGUF whose name carries that quant tag
    owner/repo:file.gguf        that file (may be in a sub-folder: owner/repo:dir/file.gguf)

A split model (NAME-00001-of-0000N.gguf) counts as one file, by its first part; every part is
downloaded and the first part's path returned (gguf_file.GGUFFile reads the rest beside it).

Downloads go through huggingface_hub (its cache, HF_HOME / HF_HUB_CACHE, HF_TOKEN, HF_ENDPOINT,
HF_HUB_OFFLINE and its progress bar). `resolve_model` prefers the cache so that starting a chat
needs no network once a model is there; `pull` always asks the hub whether the file changed.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError

# notices (a download starting, the cached copy used offline) go to the "numallm" logger; the
# CLI shows them on stderr (cli.main), a script decides for itself
log = logging.getLogger("numallm")

__all__ = ["DEFAULT_CHAT_MODEL", "HubRef", "parse_ref", "pick_gguf", "split_parts", "resolve_model", "pull"]

# Small instruct model used when `numallm chat` gets no MODEL (pinned file, ~400 MB).
DEFAULT_CHAT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q4_k_m.gguf"
PREFERRED_QUANT = "Q4_K_M"
_METADATA_TIMEOUT = 10.0  # seconds to wait for the hub's answer before calling it offline
_MAX_LISTED = 12          # files named in an "ambiguous" error; the rest are counted

_REF = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+)(?::(?P<sel>[^:]+))?")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class HubRef:
    """owner/repo plus at most one of: an exact file name, a quant tag (e.g. Q8_0)."""

    repo: str
    filename: str | None = None
    quant: str | None = None

    def __str__(self) -> str:
        sel = self.filename or self.quant
        return f"{self.repo}:{sel}" if sel else self.repo


def parse_ref(ref: str) -> HubRef | None:
    """The hub reference `ref` names, or None when it is a local path."""
    if os.path.exists(ref) or ref.startswith(("/", ".", "~")) or (os.altsep and os.altsep in ref):
        return None
    m = _REF.fullmatch(ref)
    if m is None:
        return None
    repo, sel = m.group("repo"), m.group("sel")
    if sel is None:
        # "models/x.gguf" is a (missing) local file, not a repo named x.gguf.
        return None if repo.lower().endswith(".gguf") else HubRef(repo)
    if sel.lower().endswith(".gguf"):
        return HubRef(repo, filename=sel)
    return HubRef(repo, quant=sel)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" (and {more} more)" if more > 0 else "")


def _has_quant(name: str, quant: str) -> bool:
    # The tag must stand alone in the file name: Q4_K must not match Q4_K_M.
    stem = Path(name).name[: -len(".gguf")]
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", stem, re.IGNORECASE) is not None


def pick_gguf(ref: HubRef, files: list[str]) -> str:
    """The file of `files` (a repo listing) that `ref` means; a one-line error when none or several."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf")
                   and not Path(f).name.lower().startswith("mmproj"))  # vision projectors, not LMs
    # A split model counts once, by its first part.
    ggufs = [f for f in ggufs if (m := _SPLIT.search(f)) is None or int(m.group(1)) == 1]
    if ref.filename is not None:
        if ref.filename not in files:
            raise ModelNotFoundError(
                f"{ref.repo} has no file {ref.filename}; its GGUF files: {_listing(ggufs) or 'none'}")
        chosen = ref.filename
    else:
        if not ggufs:
            raise ModelNotFoundError(f"{ref.repo} has no .gguf file; numallm needs a GGUF model repo")
        quant = ref.quant or PREFERRED_QUANT
        tagged = [f for f in ggufs if _has_quant(f, quant)]
        if len(ggufs) == 1 and ref.quant is None:
            chosen = ggufs[0]
        elif len(tagged) == 1:
            chosen = tagged[0]
        else:
            what = f"no {quant} file" if not tagged else f"several {quant} files"
            if ref.quant is None and not tagged:
                what = f"several GGUF files and none is {quant}"
            raise ModelNotFoundError(
                f"{ref.repo} has {what}: {_listing(tagged or ggufs)}; pick one as {ref.repo}:FILE.gguf")
    return chosen


def split_parts(filename: str) -> list[str]:
    """Every part of the split model `filename` names (any of its parts), first part first, in
    llama.cpp's naming PREFIX-00001-of-0000N.gguf; a single file: [filename]."""
    m = _SPLIT.search(filename)
    if m is None or int(m.group(2)) <= 1:
        return [filename]
    prefix, count = filename[:m.start()], int(m.group(2))
    return [f"{prefix}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


class HubOfflineError(ModelNotFoundError):
    """The hub cannot be reached (or HF_HUB_OFFLINE is set) and the file is not cached."""


def _offline_error(ref: HubRef, why: str = "offline (HF_HUB_OFFLINE is set)") -> HubOfflineError:
    return HubOfflineError(
        f"cannot download {ref}: {why} and it is not in the cache; "
        f"give a local file: numallm chat path/to/model.gguf")


def _classify(ref: HubRef, exc: Exception) -> Exception:
    """A one-line numallm error for a huggingface_hub / network failure (the original otherwise)."""
    import httpx2
    from huggingface_hub import errors as hf

    if isinstance(exc, hf.OfflineModeIsEnabled):
        return _offline_error(ref)
    if isinstance(exc, (httpx2.TransportError, hf.LocalEntryNotFoundError, ConnectionError)):
        return _offline_error(ref, f"offline or hub unreachable ({exc.__class__.__name__})")
    if isinstance(exc, hf.GatedRepoError):
        return ModelNotFoundError(f"{ref.repo} is gated: accept its terms on huggingface.co, then set HF_TOKEN")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return ModelNotFoundError(
            f"no local file {ref} and no Hugging Face repo {ref.repo} (a private repo needs HF_TOKEN); "
            f"check the name")
    if isinstance(exc, hf.RevisionNotFoundError):
        return ModelNotFoundError(f"{ref.repo} has no main branch; give the file as a local path")
    if isinstance(exc, hf.RemoteEntryNotFoundError):
        return ModelNotFoundError(f"{ref.repo} has no file {ref.filename}; check the name on huggingface.co/{ref.repo}")
    if isinstance(exc, hf.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return ModelNotFoundError(f"cannot download {ref}: the hub answered HTTP {status}; try again later")
    if isinstance(exc, OSError):
        return ModelNotFoundError(
            f"cannot save {ref} in the Hugging Face cache ({exc.__class__.__name__}: {exc}); "
            f"free space or point HF_HOME elsewhere")
    return exc


def _cached_ggufs(repo: str) -> list[str]:
    """GGUF files of the cached snapshot of `repo`'s main branch (repo-relative names)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    try:
        commit = (folder / "refs" / "main").read_text().strip()
    except OSError:
        return []
    snap = folder / "snapshots" / commit
    return sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*.gguf") if p.is_file())


def _cached_path(ref: HubRef, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(ref.repo, filename)
    return found if isinstance(found, str) else None


def _remote_files(ref: HubRef) -> list[str]:
    from huggingface_hub import HfApi

    info = HfApi().model_info(ref.repo, revision="main", timeout=_METADATA_TIMEOUT)
    return [s.rfilename for s in info.siblings or []]


def _choose_file(ref: HubRef, online: bool) -> str:
    """The repo file `ref` means: from the hub's listing, or from the cached snapshot offline."""
    if ref.filename is not None:
        return ref.filename
    if online:
        try:
            return pick_gguf(ref, _remote_files(ref))
        except ModelNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below; offline falls back to the cache
            err = _classify(ref, exc)
            if err is exc:
                raise
            if not isinstance(err, HubOfflineError) or not _cached_ggufs(ref.repo):
                raise err from exc
    cached = _cached_ggufs(ref.repo)
    if not cached:
        raise _offline_error(ref)
    return pick_gguf(ref, cached)


def _download(ref: HubRef, filename: str) -> str:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    full = HubRef(ref.repo, filename=filename)
    try:
        # One HEAD without retries first: huggingface_hub retries a refused connection with backoff
        # for ~25 s, which is no use when the machine is simply offline.
        get_hf_file_metadata(hf_hub_url(ref.repo, filename), timeout=_METADATA_TIMEOUT)
        if _cached_path(ref, filename) is None:
            log.info("downloading %s into the Hugging Face cache", full)
        return hf_hub_download(ref.repo, filename)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - every hub/network failure becomes one line
        err = _classify(full, exc)
        if err is exc:
            raise
        raise err from exc


def _local(ref: str) -> str:
    path = os.path.expanduser(ref)
    if os.path.isdir(path):
        raise ModelNotFoundError(f"{ref} is a directory; give the .gguf file inside it")
    if not os.path.exists(path):
        raise ModelNotFoundError(f"no such model file: {ref}; give a GGUF path or a Hugging Face owner/repo[:file]")
    if not os.path.isfile(path):   # a FIFO, a device such as /dev/zero: never opened
        raise ModelNotFoundError(f"{ref} is not a regular file; give the path of a .gguf model file")
    return path


def resolve_model(ref: str | None, *, download: bool = True) -> str:
    """Local file path for MODEL `ref` (None: DEFAULT_CHAT_MODEL), downloading it if needed.

    Hub files already in the cache are used without any network access. download=False never
    touches the network and fails (one line) when the file is not cached.
    """
    ref = ref if ref is not None else DEFAULT_CHAT_MODEL
    hub_ref = parse_ref(ref)
    if hub_ref is None:
        return _local(ref)
    from huggingface_hub import constants

    if not download and hub_ref.filename is None and not _cached_ggufs(hub_ref.repo):
        raise ModelNotFoundError(f"{hub_ref} is not downloaded; run: numallm pull {hub_ref}")
    online = download and not constants.is_offline_mode()
    names = split_parts(_choose_file(hub_ref, online))     # a split model: all its parts
    cached = [_cached_path(hub_ref, n) for n in names]
    missing = [n for n, c in zip(names, cached) if c is None]
    if not missing:
        return cached[0]
    if not download:
        raise ModelNotFoundError(f"{hub_ref.repo}:{missing[0]} is not downloaded; run: numallm pull {hub_ref}")
    if not online:
        raise _offline_error(HubRef(hub_ref.repo, filename=missing[0]))
    return [_download(hub_ref, n) for n in names][0]


def pull(ref: str | None) -> str:
    """Download (or refresh) hub model `ref` into the cache; return its local path.

    Unlike resolve_model this asks the hub for the current version even when a copy is cached;
    when the hub cannot be reached a cached copy is still returned (with a warning). A local path
    is just checked and returned.
    """
    ref = ref if ref is not None else DEFAULT_CHAT_MODEL
    hub_ref = parse_ref(ref)
    if hub_ref is None:
        return _local(ref)
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return resolve_model(ref)  # cache only; the offline error when not there
    paths = []
    for filename in split_parts(_choose_file(hub_ref, online=True)):   # every part of a split model
        try:
            paths.append(_download(hub_ref, filename))
        except HubOfflineError as err:
            cached = _cached_path(hub_ref, filename)
            if cached is None:
                raise
            log.warning("warning: hub unreachable (%s); using the cached copy of %s",
                        err.__cause__.__class__.__name__, filename)
            paths.append(cached)
    return paths[0]
