"""App packages (paas.md, Apps: `PUT .../apps/{a}/package`): receive, check,
store by digest, unpack.

    <state_dir>/packages/<tenant>/<app>/sha256-<hex>.tar.gz

`store` reads the upload in chunks into a temporary file beside its final
place, hashing as it goes, and never holds more than one chunk in memory:
past LIMIT bytes (50 MiB) it stops reading and refuses with 413. Then the
file must be a readable .tar.gz (400 otherwise) whose every member stays
inside the package's directory: a regular file or a directory, with a
relative name that has no ".." component and does not normalise outside.
Absolute names, symlinks, hard links, devices and fifos are refused (400,
naming the member); so is a package that would unpack to more than
UNPACKED_LIMIT bytes or MAX_MEMBERS members (413). A good file is fsynced and
renamed into place (atomic); the same bytes stored twice are one file.

`unpack` extracts a stored package into a new directory, checking every
member again, with tarfile's "data" filter when this Python has it, and
renames the finished tree into place, so `dest` is either complete or absent."""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO

from bus.files import fsync_dir

from . import AppError
from .manifest import check_app_name

LIMIT = 50 * 1024 * 1024            # bytes of .tar.gz (paas.md)
UNPACKED_LIMIT = 512 * 1024 * 1024  # bytes of members once unpacked: no gzip bombs
MAX_MEMBERS = 20_000
CHUNK = 64 * 1024
_TENANT_RE = re.compile(r"^[a-z][a-z0-9-]{1,31}$")
_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, UnicodeError, ValueError)


class PackageError(AppError):
    pass


def check_member(m: tarfile.TarInfo) -> None:
    """PackageError(400) unless the member is a plain file or directory whose
    name stays inside the package's directory."""
    name = m.name
    if not name or "\x00" in name:
        raise PackageError(400, f"member {name!r}: empty or invalid name")
    if name.startswith("/") or name.startswith("\\") or re.match(r"^[A-Za-z]:", name):
        raise PackageError(400, f"member {name!r}: an absolute path")
    if ".." in re.split(r"[/\\]", name):
        raise PackageError(400, f"member {name!r}: a '..' component leaves the package's directory")
    norm = posixpath.normpath(name)
    if norm.startswith("../") or norm == ".." or norm.startswith("/"):
        raise PackageError(400, f"member {name!r}: normalises outside the package's directory")
    if m.issym() or m.islnk():
        raise PackageError(400, f"member {name!r}: links are not allowed (to {m.linkname!r})")
    if not (m.isreg() or m.isdir()):
        raise PackageError(400, f"member {name!r}: only files and directories are allowed, not a device or fifo")


def check_archive(path: Path) -> int:
    """Every member of the .tar.gz at `path` checked; the number of members."""
    total = count = 0
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for m in tar:
                check_member(m)
                count += 1
                total += m.size
                if count > MAX_MEMBERS:
                    raise PackageError(413, f"a package has at most {MAX_MEMBERS} members")
                if total > UNPACKED_LIMIT:
                    raise PackageError(413, f"a package unpacks to at most {UNPACKED_LIMIT} bytes")
    except PackageError:
        raise
    except _READ_ERRORS as exc:
        raise PackageError(400, f"not a readable .tar.gz: {type(exc).__name__}: {exc}") from None
    if count == 0:
        raise PackageError(400, "the package is empty")
    return count


class Packages:
    def __init__(self, state_dir: str | os.PathLike):
        self.root = Path(state_dir) / "packages"

    def dir(self, tenant: str, app: str) -> Path:
        if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
            raise PackageError(400, f"not a tenant name: {tenant!r}")
        try:
            check_app_name(app)
        except AppError as exc:
            raise PackageError(400, exc.message) from None
        return self.root / tenant / app

    def path(self, tenant: str, app: str, digest: str) -> Path:
        m = _DIGEST_RE.fullmatch(digest) if isinstance(digest, str) else None
        if not m:
            raise PackageError(400, f"not a package digest: {digest!r}")
        return self.dir(tenant, app) / f"sha256-{m.group(1)}.tar.gz"

    def exists(self, tenant: str, app: str, digest: str) -> bool:
        return self.path(tenant, app, digest).is_file()

    def store(self, tenant: str, app: str, body: BinaryIO, *, length: int | None = None,
              limit: int = LIMIT) -> str:
        """Store the package read from `body` (anything with read(n));
        returns its digest "sha256:<hex>". `length`, when the request declares
        one, is refused at once if over the limit."""
        if length is not None and length > limit:
            raise PackageError(413, f"a package is at most {limit} bytes, not {length}")
        d = self.dir(tenant, app)
        d.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".upload-", suffix=".part")
        try:
            size = 0
            with os.fdopen(fd, "wb") as f:
                while True:
                    chunk = body.read(CHUNK)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > limit:
                        raise PackageError(413, f"a package is at most {limit} bytes")
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if size == 0:
                raise PackageError(400, "not a readable .tar.gz: the body is empty")
            check_archive(Path(tmp))
            digest = "sha256:" + h.hexdigest()
            os.replace(tmp, self.path(tenant, app, digest))
            tmp = None
            fsync_dir(d)
            return digest
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    def unpack(self, tenant: str, app: str, digest: str, dest: str | os.PathLike) -> Path:
        """Extract a stored package into `dest` (which must not exist yet)."""
        src = self.path(tenant, app, digest)
        if not src.is_file():
            raise PackageError(404, f"no package {digest} for {tenant}/{app}")
        dest = Path(dest)
        if dest.exists():
            raise FileExistsError(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
        try:
            try:
                with tarfile.open(src, mode="r:gz") as tar:
                    for m in tar:
                        check_member(m)
                        if hasattr(tarfile, "data_filter"):
                            tar.extract(m, work, filter="data")
                        else:  # pragma: no cover - older 3.11 patch releases
                            _extract_checked(tar, m, work)
            except PackageError:
                raise
            except _READ_ERRORS as exc:
                raise PackageError(400, f"not a readable .tar.gz: {type(exc).__name__}: {exc}") from None
            os.rename(work, dest)
            work = None
            return dest
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)

    def delete(self, tenant: str, app: str) -> None:
        """Remove every stored package of an app."""
        shutil.rmtree(self.dir(tenant, app), ignore_errors=True)

    def delete_tenant(self, tenant: str) -> None:
        """Remove every stored package of a tenant."""
        if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
            raise PackageError(400, f"not a tenant name: {tenant!r}")
        shutil.rmtree(self.root / tenant, ignore_errors=True)


def _extract_checked(tar: tarfile.TarFile, m: tarfile.TarInfo, root: Path) -> None:
    """A checked member written by hand: no links, no special files, and the
    resolved target inside `root` (the parents made here are real directories)."""
    target = (root / m.name).resolve()
    if target != root.resolve() and root.resolve() not in target.parents:
        raise PackageError(400, f"member {m.name!r}: resolves outside the package's directory")
    if m.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    src = tar.extractfile(m)
    with open(target, "wb") as out:
        shutil.copyfileobj(src, out, CHUNK)
    os.chmod(target, 0o755 if m.mode & 0o100 else 0o644)
