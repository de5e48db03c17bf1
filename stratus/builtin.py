"""The built-in apps (rideshare/, toystore/; docs/apps.md): `stratus up`
deploys them through the platform API exactly as a tenant deploys its own
app, from the manifests in the repository:

    <tenant>/manifest.json    the app's manifest (the app is named after its tenant)
    <tenant>/package.txt      the repository directories its package holds

The package is a reproducible .tar.gz (sorted members, no times, no owners,
no __pycache__), so deploying an unchanged checkout again stores the same
digest and PUTs the same manifest: the platform replaces nothing."""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parent.parent
BUILT_IN = ("rideshare", "toystore")
SKIP_DIRS = {"__pycache__", ".git", ".pytest_cache", ".mypy_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo")


class DeployError(Exception):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def excluded(rel: str, is_dir: bool) -> bool:
    """Left out of every package: caches and .git, compiled files."""
    name = rel.rsplit("/", 1)[-1]
    return name in SKIP_DIRS if is_dir else name.endswith(SKIP_SUFFIXES)


def walk(directory: Path, prefix: str = "") -> tuple[list[tuple[str, Path]], list[str]]:
    """(files, skipped) under `directory`: (name in the package, path) for
    each regular file, named `prefix` + its path relative to `directory`,
    sorted; links and special files are skipped (and named), never followed."""
    files: list[tuple[str, Path]] = []
    skipped: list[str] = []
    for root, dirs, names in os.walk(directory, followlinks=False):
        base = Path(root)
        relroot = base.relative_to(directory).as_posix()
        at = prefix + ("" if relroot == "." else relroot + "/")
        keep = []
        for d in sorted(dirs):
            if (base / d).is_symlink():
                skipped.append(at + d)
            elif not excluded(at + d, True):
                keep.append(d)
        dirs[:] = keep
        for name in sorted(names):
            p = base / name
            if p.is_symlink() or not p.is_file():
                skipped.append(at + name)
            elif not excluded(at + name, False):
                files.append((at + name, p))
    return sorted(files), skipped


def members(base: Path, dirs: Iterable[str]) -> list[tuple[str, Path]]:
    """(name in the package, file) for every file under the given
    directories of `base` (each kept under its own name), sorted."""
    out = []
    for d in dirs:
        top = (base / d).resolve()
        if not top.is_dir() or base.resolve() not in top.parents:
            raise DeployError(f"{d!r} is not a directory of {base}")
        out += walk(top, prefix=top.relative_to(base.resolve()).as_posix() + "/")[0]
    return sorted(out)


def tarball(files: Iterable[tuple[str, Path]]) -> bytes:
    """A reproducible .tar.gz of `files` ((name, path) pairs)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in sorted(files):
            info = tarfile.TarInfo(name)
            data = path.read_bytes()
            info.size = len(data)
            info.mode = 0o755 if path.stat().st_mode & 0o100 else 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def builtin_package(tenant: str, root: Path = ROOT) -> tuple[dict, bytes]:
    """(manifest, package bytes) of a built-in app, from `root` (the
    repository, or a copy of its sources: stratus/deploy_builtin.py)."""
    d = root / tenant
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise DeployError(f"{d / 'manifest.json'}: {exc}") from None
    try:
        lines = (d / "package.txt").read_text().splitlines()
    except OSError as exc:
        raise DeployError(f"{d / 'package.txt'}: {exc}") from None
    dirs = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return manifest, tarball(members(root, dirs))


def _http(base: str, method: str, path: str, body: bytes | None, ctype: str, timeout: float,
          token: str | None = None):
    headers = {"Content-Type": ctype}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base.rstrip("/") + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            msg = e.reason
        raise DeployError(f"{method} {path}: {e.code}: {msg}", e.code) from None
    except (urllib.error.URLError, OSError) as e:
        raise DeployError(f"cannot reach {base}: {getattr(e, 'reason', e)}") from None


def deploy(base: str, tenant: str, app: str, manifest: dict, package: bytes, *, token: str | None = None,
           timeout: float = 60.0) -> dict:
    """PUT the package, then the manifest naming its digest; returns the app view."""
    _, r = _http(base, "PUT", f"/api/v1/tenants/{tenant}/apps/{app}/package", package, "application/gzip",
                 timeout, token)
    digest = r["digest"]
    _, view = _http(base, "PUT", f"/api/v1/tenants/{tenant}/apps/{app}?digest={digest}",
                    json.dumps(manifest).encode(), "application/json", timeout, token)
    return view


def get_app(base: str, tenant: str, app: str, *, token: str | None = None, timeout: float = 10.0) -> dict:
    return _http(base, "GET", f"/api/v1/tenants/{tenant}/apps/{app}", None, "application/json", timeout, token)[1]


def wait_running(base: str, tenant: str, app: str, timeout: float = 60.0, *, token: str | None = None,
                 progress=None) -> dict:
    """Poll the app until every role runs its desired count (DeployError
    after `timeout`). `progress(view)` is called when the counts change."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        view = get_app(base, tenant, app, token=token)
        counts = {r: (v["running"], v["desired"]) for r, v in view["roles"].items()}
        if counts != last and progress is not None:
            progress(view)
        last = counts
        if all(run == want for run, want in counts.values()):
            return view
        if time.monotonic() > deadline:
            raise DeployError(f"{tenant}/{app} not running after {timeout:.0f}s: " +
                              ", ".join(f"{r} {a}/{b}" for r, (a, b) in counts.items()))
        time.sleep(0.2)


def deploy_builtin(base: str, tenant: str, *, timeout: float = 60.0, root: Path = ROOT) -> dict:
    """Deploy a built-in app (retrying while the orchestrator answers 5xx or
    not at all, for at most `timeout` seconds); returns the app view."""
    manifest, package = builtin_package(tenant, root)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return deploy(base, tenant, tenant, manifest, package)
        except DeployError as exc:
            if (exc.status is None or exc.status >= 500) and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            raise
