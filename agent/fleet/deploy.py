"""Deploy a portfolio archive to this device, switch to it atomically, and roll back.

Layout under the state directory:

    portfolios/<name>-<sha256[:12]>/   extracted, verified portfolios (sha256 of the archive;
                                       of manifest.json for one adopted by install_initial)
    portfolios/current  -> one of them (a relative symlink, switched with os.replace)
    portfolios/previous -> the one before
    staging/                           downloads and extractions in progress

stage() does every check (size, sha256, safe extraction, checksums, signature, health) away from
`current`; only activate() and rollback() move the pointers. A failure at any step raises a
DeployError naming the step, leaves staging empty and the device on what it served.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Dict

from agent.backends import BackendError, get_backend
from agent.portfolio import MANIFEST_FILE, Portfolio, PortfolioError
from agent.runtime import Runtime, health_check
from agent.signing import SIGNATURE_FILE, verify_manifest_signature

CURRENT = "current"
PREVIOUS = "previous"
_CHUNK = 1 << 20
_MAX_MEMBERS = 10000  # an archive of a few variants has tens of files; more is an inode bomb
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_SIGNATURE_BYTES = 64  # ed25519


class DeployError(Exception):
    """A deploy or rollback that did not happen; the message names the step and the reason."""


@dataclass(frozen=True)
class DeployRequest:
    source: str  # http(s) URL or local path of a .tar.gz of a portfolio directory
    sha256: str  # of the archive
    signature: str | None = None  # ed25519 over manifest.json, hex or base64; else the archive's manifest.sig

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise DeployError(f"request: source must be a URL or a path, got {self.source!r}")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise DeployError(f"request: sha256 must be 64 hex digits, got {self.sha256!r}")
        if self.signature is not None and not isinstance(self.signature, str):
            raise DeployError(f"request: signature must be a hex or base64 string, got {type(self.signature).__name__}")


@dataclass(frozen=True)
class Deployed:
    path: Path  # the portfolio now current
    previous: Path | None  # the one rollback() would return to
    name: str
    digest: str  # Portfolio.digest of the current one


HealthCheck = Callable[[Portfolio], Dict[str, str]]  # typing's generics: evaluated here (Python 3.8)


def onnxruntime_health_check(portfolio: Portfolio) -> dict[str, str]:
    """{variant id: problem} for every variant whose ONNX outputs differ from samples.npz (1 thread)."""
    runtime = Runtime(portfolio, get_backend("onnxruntime"), threads=1, preload="lazy")
    samples = portfolio.samples()
    problems = {}
    for variant in portfolio.manifest.variants:
        problem = health_check(runtime, variant, samples.inputs, samples.expected[variant.id])
        if problem:
            problems[variant.id] = problem
    return problems


class PortfolioStore:
    """The portfolios kept on this device, and the current/previous pointers.

    max_download_bytes bounds both the archive and its unpacked contents.
    """

    def __init__(self, state_dir: Path, max_download_bytes: int = 512 << 20, public_key: Path | None = None,
                 health_check: HealthCheck | None = None, download_timeout_s: float = 60.0):
        if max_download_bytes < 1:
            raise ValueError(f"max_download_bytes must be positive, got {max_download_bytes}")
        self.state_dir = Path(state_dir)
        self.portfolios = self.state_dir / "portfolios"
        self.staging = self.state_dir / "staging"
        self.max_download_bytes = max_download_bytes
        self.public_key = None if public_key is None else Path(public_key)
        self.health_check = health_check or onnxruntime_health_check
        self.download_timeout_s = download_timeout_s
        self._lock = threading.RLock()
        self.portfolios.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        for leftover in self.staging.iterdir():  # from a deploy interrupted by a crash or power cut
            _remove(leftover)

    # ------------------------------------------------------------------ pointers

    def current(self) -> Path | None:
        return self._target(CURRENT)

    def previous(self) -> Path | None:
        return self._target(PREVIOUS)

    def _target(self, pointer: str) -> Path | None:
        link = self.portfolios / pointer
        if link.is_symlink():
            return self.portfolios / os.readlink(link)  # a relative target resolves here; an absolute one stays
        if link.is_dir():  # installed by hand: `cp -r portfolio/ .../portfolios/current`
            return link
        return None

    def _point(self, pointer: str, target: str) -> None:
        """Make portfolios/<pointer> a symlink to target, atomically (there is never a moment without one)."""
        temporary = self.portfolios / f".{pointer}.{os.getpid()}.{threading.get_ident()}.tmp"
        temporary.unlink(missing_ok=True)
        os.symlink(target, temporary)
        os.replace(temporary, self.portfolios / pointer)

    def _adopt_hand_installed_current(self) -> None:
        """A real directory named `current` cannot be replaced atomically: move it among the others first."""
        link = self.portfolios / CURRENT
        if link.is_symlink() or not link.is_dir():
            return
        try:
            portfolio = Portfolio.open(link, verify=False)
            name = _directory_name(portfolio.manifest.name, portfolio.digest)
        except PortfolioError:
            name = f"unreadable-{time.strftime('%Y%m%dT%H%M%S')}"
        target = _unused(self.portfolios / name)
        os.rename(link, target)
        self._point(CURRENT, target.name)

    # ------------------------------------------------------------------ installing

    def install_initial(self, directory: Path) -> Path:
        """Adopt an existing portfolio directory as current (copied into portfolios/); returns the copy."""
        directory = Path(directory)
        with self._lock:
            current = self.current()
            if current is not None and directory.resolve() == current.resolve():
                self._adopt_hand_installed_current()
                return self.current()
            try:
                portfolio = Portfolio.open(directory, verify=True)
            except PortfolioError as error:
                raise DeployError(f"install: {directory}: {error}") from None
            work = Path(tempfile.mkdtemp(dir=self.staging))
            try:
                copy = work / "portfolio"
                try:
                    shutil.copytree(directory, copy, symlinks=True)
                except OSError as error:
                    raise DeployError(f"install: copying {directory} failed: {error}") from None
                installed = self._move_in(copy, _directory_name(portfolio.manifest.name, portfolio.digest))
            finally:
                _remove(work)
            self.activate(installed)
            return installed

    def stage(self, request: DeployRequest) -> Path:
        """Download, verify, extract, check and health-check a portfolio; returns its directory in portfolios/.

        Never touches current or previous: activate() does that.
        """
        work = Path(tempfile.mkdtemp(dir=self.staging))  # its own folder: deploys may run side by side
        try:
            archive = work / "portfolio.tar.gz"
            digest = self._download(request.source, archive)
            if digest != request.sha256.lower():
                raise DeployError(f"sha256: the archive's is {digest}, the request says {request.sha256.lower()}; "
                                  "refusing a corrupt or different file")
            root = self._extract(archive, work / "tree")
            archive.unlink()
            portfolio = self._verify(root, request.signature)
            with self._lock:
                return self._move_in(root, _directory_name(portfolio.manifest.name, digest))
        finally:
            _remove(work)

    def _download(self, source: str, destination: Path) -> str:
        """Copy source to destination, enforcing the size limit while streaming; returns the sha256."""
        url = urllib.parse.urlsplit(source)
        try:
            if url.scheme in ("http", "https"):
                opened = urllib.request.urlopen(source, timeout=self.download_timeout_s)
                declared = opened.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self.max_download_bytes:
                    opened.close()
                    raise DeployError(f"download: {source} is {int(declared)} bytes, over the limit of "
                                      f"{self.max_download_bytes}")
            elif url.scheme == "file":
                opened = open(urllib.request.url2pathname(url.path), "rb")
            elif url.scheme and not os.path.exists(source):  # "ftp://...", but not a file named "a:b.tar.gz"
                raise DeployError(f"download: unsupported source {source!r}; give an http(s) URL or a local path")
            else:
                opened = open(source, "rb")
            with opened:
                return _copy_limited(opened, destination, self.max_download_bytes, source)
        except urllib.error.HTTPError as error:
            raise DeployError(f"download: {source}: HTTP {error.code} {error.reason}") from None
        except urllib.error.URLError as error:
            raise DeployError(f"download: {source}: {error.reason}") from None
        except (OSError, ValueError, http.client.HTTPException) as error:  # timeouts, resets, missing files, bad URLs
            raise DeployError(f"download: {source}: {error}") from None

    def _extract(self, archive: Path, destination: Path) -> Path:
        """Unpack only regular files and directories, all inside destination; returns the portfolio root."""
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = _checked_members(tar, self.max_download_bytes)
                destination.mkdir()
                for member in members:
                    _extract_member(tar, member, destination)
        except tarfile.TarError as error:
            raise DeployError(f"extract: not a readable .tar.gz archive ({error})") from None
        except (OSError, EOFError) as error:  # truncated or corrupt compressed data, a full disk
            raise DeployError(f"extract: {error}") from None
        if (destination / MANIFEST_FILE).is_file():
            return destination
        entries = list(destination.iterdir())
        if len(entries) == 1 and (entries[0] / MANIFEST_FILE).is_file():
            return entries[0]
        raise DeployError(f"extract: no {MANIFEST_FILE} at the archive's top level or inside a single top-level folder")

    def _verify(self, root: Path, signature: str | None) -> Portfolio:
        try:
            portfolio = Portfolio.open(root, verify=True)
        except PortfolioError as error:
            raise DeployError(f"verify: {error}") from None
        if signature is not None:
            (root / SIGNATURE_FILE).write_bytes(_decode_signature(signature))
        if self.public_key is not None:
            try:
                verify_manifest_signature(root, self.public_key)
            except PortfolioError as error:
                raise DeployError(f"signature: {error}") from None
        try:
            problems = self.health_check(portfolio)
        except (PortfolioError, BackendError) as error:
            raise DeployError(f"health check: {error}") from None
        if problems:
            listed = "; ".join(f"variant '{variant}': {problem}" for variant, problem in problems.items())
            raise DeployError(f"health check: {listed}")
        return portfolio

    def _move_in(self, directory: Path, name: str) -> Path:
        """Move a verified directory from staging to portfolios/<name>; an identical one in use is kept as it is."""
        target = self.portfolios / name
        if target.exists() or target.is_symlink():
            in_use = {path.resolve() for path in (self.current(), self.previous()) if path is not None}
            if target.resolve() in in_use:
                return target  # same archive (or manifest) as one already serving: nothing to replace
            _remove(target)
        os.rename(directory, target)
        os.utime(target)  # prune() keeps the most recently installed
        return target

    # ------------------------------------------------------------------ switching

    def activate(self, directory: Path) -> Deployed:
        """Make directory current and what was current previous, each pointer switched atomically."""
        directory = Path(directory)
        with self._lock:
            if (directory.is_symlink() or not directory.is_dir() or directory.name in (CURRENT, PREVIOUS)
                    or directory.resolve().parent != self.portfolios.resolve()):
                raise DeployError(f"activate: {directory} is not a portfolio directory in {self.portfolios}; "
                                  "stage() or install_initial() it first")
            name, digest = _describe(directory, "activate")
            self._adopt_hand_installed_current()
            current = self.current()
            if current is not None and current.resolve() != directory.resolve():
                self._point(PREVIOUS, os.readlink(self.portfolios / CURRENT))
            self._point(CURRENT, directory.name)
            return Deployed(path=self.current(), previous=self.previous(), name=name, digest=digest)

    def rollback(self) -> Deployed:
        """Swap current and previous; twice returns to the start."""
        with self._lock:
            previous, current = self.previous(), self.current()
            if previous is None:
                raise DeployError("rollback: there is no previous portfolio to return to")
            if not previous.is_dir():
                raise DeployError(f"rollback: the previous portfolio {previous} is missing")
            name, digest = _describe(previous, "rollback")
            self._adopt_hand_installed_current()
            previous_link = os.readlink(self.portfolios / PREVIOUS)
            if current is not None:
                self._point(PREVIOUS, os.readlink(self.portfolios / CURRENT))
            self._point(CURRENT, previous_link)
            return Deployed(path=self.current(), previous=self.previous(), name=name, digest=digest)

    def prune(self, keep: int = 3) -> None:
        """Remove all but the `keep` most recently installed portfolios; current and previous always stay."""
        if keep < 0:
            raise ValueError(f"keep must be 0 or more, got {keep}")
        with self._lock:
            in_use = {path.resolve() for path in (self.current(), self.previous()) if path is not None}
            others = [path for path in self.portfolios.iterdir()
                      if path.is_dir() and not path.is_symlink() and path.name not in (CURRENT, PREVIOUS)
                      and path.resolve() not in in_use]
            others.sort(key=lambda path: path.stat().st_mtime, reverse=True)
            for path in others[max(0, keep - len(in_use)):]:
                _remove(path)


# ---------------------------------------------------------------------- helpers


def _copy_limited(stream: BinaryIO, destination: Path, limit: int, source: str) -> str:
    digest = hashlib.sha256()
    written = 0
    with open(destination, "wb") as out:
        while chunk := stream.read(_CHUNK):
            written += len(chunk)
            if written > limit:
                raise DeployError(f"download: {source} is over the limit of {limit} bytes; aborted")
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _checked_members(tar: tarfile.TarFile, max_unpacked_bytes: int) -> list[tarfile.TarInfo]:
    """Every member, once each is known safe: a path inside the root, a regular file or a directory."""
    members: list[tarfile.TarInfo] = []
    unpacked = 0
    for member in tar:
        name = member.name
        parts = name.replace("\\", "/").split("/")
        if parts[0] == "":
            raise DeployError(f"extract: member {name!r} has an absolute path")
        if ".." in parts:
            raise DeployError(f"extract: member {name!r} has a '..' component (it would land outside the portfolio)")
        if member.issym() or member.islnk():
            raise DeployError(f"extract: member {name!r} is a link (to {member.linkname!r}); portfolios hold "
                              "regular files and directories only")
        if member.isdev():
            raise DeployError(f"extract: member {name!r} is a device file or FIFO")
        if not (member.isfile() or member.isdir()) or member.issparse():
            raise DeployError(f"extract: member {name!r} is neither a regular file nor a directory")
        unpacked += member.size if member.isfile() else 0
        if unpacked > max_unpacked_bytes:
            raise DeployError(f"extract: member {name!r} takes the unpacked size over the limit of "
                              f"{max_unpacked_bytes} bytes (a tar bomb?)")
        members.append(member)
        if len(members) > _MAX_MEMBERS:
            raise DeployError(f"extract: more than {_MAX_MEMBERS} members (at {name!r})")
    return members


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path) -> None:
    """Write one checked member with default permissions (no owners, modes or times from the archive)."""
    parts = [part for part in member.name.replace("\\", "/").split("/") if part not in ("", ".")]
    if not parts:
        return  # the archive's "." entry
    path = root.joinpath(*parts)
    if member.isdir():
        path.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    try:
        with open(path, "xb") as out:
            shutil.copyfileobj(source, out, _CHUNK)
    except FileExistsError:
        raise DeployError(f"extract: member {member.name!r} appears twice in the archive") from None
    finally:
        source.close()


def _describe(directory: Path, step: str) -> tuple[str, str]:
    """The portfolio's name and digest; a DeployError if its manifest cannot be read."""
    try:
        portfolio = Portfolio.open(directory, verify=False)
    except PortfolioError as error:
        raise DeployError(f"{step}: {directory}: {error}") from None
    return portfolio.manifest.name, portfolio.digest


def _decode_signature(text: str) -> bytes:
    text = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]+", text):
        signature = bytes.fromhex(text) if len(text) % 2 == 0 else b""
    else:
        try:
            signature = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            signature = b""
    if len(signature) != _SIGNATURE_BYTES:
        raise DeployError(f"signature: not a {_SIGNATURE_BYTES}-byte ed25519 signature in hex or base64")
    return signature


def _directory_name(portfolio_name: str, digest: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", portfolio_name).strip(".-") or "portfolio"
    return f"{safe[:64]}-{digest[:12]}"


def _unused(path: Path) -> Path:
    candidate, suffix = path, 1
    while candidate.exists() or candidate.is_symlink():
        candidate = path.with_name(f"{path.name}-{suffix}")
        suffix += 1
    return candidate


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
