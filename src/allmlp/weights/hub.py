"""Published weights by name: a local cache filled from the authors' hosts (or a mirror), verified before use.

The cache (`$ALLMLP_HOME`, else `$XDG_CACHE_HOME/allmlp`, else `~/.cache/allmlp`) mirrors the hosts' paths:
`mixer_models/imagenet1k/Mixer-B_16.npz`, `ShoufaChen/CycleMLP/releases/download/v0.1/CycleMLP_B1.pth`, ...
(`WeightRelease.file_name`). A mirror (`ALLMLP_WEIGHTS_URL`) serves the same tree, so a cache folder behind any
static web server is one. A download goes to `<file>.part` under a file lock (concurrent processes fetch once),
resumes with an HTTP Range request when the connection drops, and is moved into place only once its size,
SHA-256 (where the registry knows them) and format (the content must be what the name says) check out.
Nothing here unpickles: the file is read later by `files.read_weights`, which loads tensors only.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from .files import WeightsError, detect_format

if TYPE_CHECKING:
    from ..models.registry import WeightRelease

ATTEMPTS = 3  # requests per download: a dropped connection is resumed from the bytes on disk, twice at most
_CHUNK = 1 << 20
_FORMAT_BY_SUFFIX = {
    ".npz": "npz",
    ".safetensors": "safetensors",
    ".pth": "torch",
    ".pt": "torch",
    ".bin": "torch",
    ".tar": "torch",
}  # .tar: torch.save files named .pth.tar (timm-era training scripts)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


class DownloadError(WeightsError):
    """A published weight file could not be fetched; the message names the URL and where to put the file."""


def cache_dir() -> Path:
    if os.environ.get("ALLMLP_HOME"):
        return Path(os.environ["ALLMLP_HOME"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "allmlp"


def cache_path(release: WeightRelease) -> Path:
    return cache_dir() / release.file_name


def offline() -> bool:
    return os.environ.get("ALLMLP_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def release_url(release: WeightRelease, mirror: str | None = None) -> str:
    """The URL to fetch: the mirror (argument, else `ALLMLP_WEIGHTS_URL`) + the file's path, else the host's."""
    mirror = mirror or os.environ.get("ALLMLP_WEIGHTS_URL")
    if mirror:
        return f"{mirror.rstrip('/')}/{release.file_name}"
    return release.url


def fetch_release(
    release: WeightRelease,
    label: str,
    *,
    mirror: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """The cached, verified file of `release` (label: 'model.tag', for messages), downloaded first if needed."""
    path = cache_path(release)
    if path.exists():
        return _verified_cached(path, release)
    url = release_url(release, mirror)
    if offline():
        raise DownloadError(
            f"{label}: ALLMLP_OFFLINE is set and the file is not in the cache: looked for {path}. "
            + _by_hand(release, path)
        )
    if not url:
        raise DownloadError(
            f"{label}: {release.page} needs a browser. Open it, download the file and save it as {path} "
            f"(or set ALLMLP_WEIGHTS_URL to a mirror that has {release.file_name})"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(path.name + ".lock")):
        if path.exists():  # another process downloaded it while this one waited for the lock
            return _verified_cached(path, release)
        part = path.with_name(path.name + ".part")
        _download(url, part, timeout, progress, release, path)
        _verify(part, release, f"{release.file_name} downloaded from {url}", discard=True)
        os.replace(part, path)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _by_hand(release: WeightRelease, path: Path) -> str:
    return (
        f"Place the file by hand at {path} (from {release.url or release.page}, or any copy of it), serve the "
        f"cache layout from a mirror (ALLMLP_WEIGHTS_URL), or pass the file to create_model(..., weights=PATH)"
    )


def _verified_cached(path: Path, release: WeightRelease) -> Path:
    _verify(path, release, f"{path} (in the cache; delete it to download it again)", discard=False)
    return path


def _verify(path: Path, release: WeightRelease, what: str, discard: bool) -> None:
    """Size and SHA-256 where the registry knows them, and the format the name promises; `discard` a failure."""
    problem = None
    size = path.stat().st_size
    if release.size is not None and size != release.size:
        problem = f"expected {release.size} bytes, received {size}"
    elif release.sha256 is not None and (received := sha256_of(path)) != release.sha256:
        problem = f"expected sha256 {release.sha256}, received {received}"
    else:
        expected = _FORMAT_BY_SUFFIX.get(Path(release.file_name).suffix)
        try:
            found = detect_format(path)
        except WeightsError as err:
            found = str(err).removeprefix(f"{path}: ")
        if found != expected:
            problem = f"its name says {expected}, its content is {found}"
    if problem is not None:
        if discard:
            path.unlink()
        raise DownloadError(f"{what}: {problem}" + ("; nothing was kept" if discard else ""))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive `flock` on a lock file: other processes (torchrun ranks) wait here until the holder is done.

    The lock file stays afterwards: removing it would race a process that has opened it and waits for the lock.
    """
    import fcntl  # POSIX only; imported here so that the rest of allmlp still imports elsewhere

    with open(path, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        yield


def _download(url: str, part: Path, timeout: float, progress: bool, release: WeightRelease, path: Path) -> None:
    """Fill `part` with the whole body of `url`, resuming from what `part` already holds."""
    failure = ""
    for _ in range(ATTEMPTS):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:
                if err.headers.get("Content-Range") == f"bytes */{have}":  # complete, only the rename was missed
                    return
                part.unlink()  # what is on disk is longer than the file: start over
                failure = "the partial file did not fit the server's, restarted"
                continue
            raise DownloadError(
                f"cannot download {url}: HTTP {err.code} {err.reason}. {_by_hand(release, path)}"
            ) from err
        except (OSError, http.client.HTTPException) as err:  # no network, refused, timed out, dropped
            failure = str(getattr(err, "reason", err)) or type(err).__name__
            continue
        with response:
            if response.status == 206:
                match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
                if match is None or int(match[1]) != have:
                    raise DownloadError(f"{url}: the server answered a Range request with another part")
                total = int(match[2]) if match[2] != "*" else None
            else:  # a server without Range support sends everything again
                have = 0
                length = response.headers.get("Content-Length")
                total = int(length) if length is not None else None
            try:
                _copy(response, part, have, total, progress)
            except (OSError, http.client.HTTPException) as err:
                failure = str(err) or type(err).__name__
                continue
        received = part.stat().st_size
        if total is None or received == total:
            return
        # http.client ends a body that closes early without an error: the length is the only evidence.
        failure = f"the connection closed after {received} of {total} bytes"
    raise DownloadError(f"cannot download {url} ({failure}; {ATTEMPTS} attempts). {_by_hand(release, path)}")


def _copy(response: http.client.HTTPResponse, part: Path, have: int, total: int | None, progress: bool) -> None:
    with (
        open(part, "ab" if have else "wb") as out,
        tqdm(
            total=total,
            initial=have,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            file=sys.stderr,
            disable=not progress,
        ) as bar,
    ):
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            bar.update(len(chunk))
