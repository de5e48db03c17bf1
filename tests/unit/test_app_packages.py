"""App packages (orchestrator/apps/packages.py): real .tar.gz files on disk,
with each kind of hostile member, refused with 400 naming the member; a
stream past 50 MiB refused with 413 while reading, without reading it all or
holding it in memory; a corrupt gzip 400; the digest and the atomic store;
a safe unpack."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import tracemalloc

import pytest

from orchestrator.apps import packages as pk
from orchestrator.apps.packages import PackageError, Packages


def tgz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def f(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def special(name: str, type_: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    return info, None


def good() -> bytes:
    d = tarfile.TarInfo("shop")
    d.type = tarfile.DIRTYPE
    run = tarfile.TarInfo("shop/run.sh")
    run.mode = 0o755
    return tgz([(d, None), (run, b"#!/bin/sh\necho hi\n"), f("shop/__init__.py", b"GREETING = 'hi'\n"),
                f("./manifest.json", b"{}")])


@pytest.fixture
def store(tmp_path) -> Packages:
    return Packages(tmp_path / "state")


def refused(store: Packages, body: bytes, status: int = 400, **kw) -> str:
    with pytest.raises(PackageError) as e:
        store.store("acme", "shop", io.BytesIO(body), **kw)
    assert e.value.status == status, e.value.message
    assert e.value.message
    return e.value.message


def leftovers(store: Packages) -> list[str]:
    d = store.root / "acme" / "shop"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_store_digest_and_path(store):
    body = good()
    digest = store.store("acme", "shop", io.BytesIO(body))
    assert digest == "sha256:" + hashlib.sha256(body).hexdigest()
    path = store.root / "acme" / "shop" / f"sha256-{hashlib.sha256(body).hexdigest()}.tar.gz"
    assert store.path("acme", "shop", digest) == path
    assert path.read_bytes() == body
    assert store.exists("acme", "shop", digest)
    # the same bytes again: one file, same digest, no temporary files left
    assert store.store("acme", "shop", io.BytesIO(body)) == digest
    assert leftovers(store) == [path.name]


@pytest.mark.parametrize("member", [
    f("../x"), f("a/../../x"), f("a/.."), f("..\\x"),
    f("/etc/x"), f("\\etc\\x"),
    special("link", tarfile.SYMTYPE, "/"), special("a/link", tarfile.SYMTYPE, "../../.."),
    special("ok-link", tarfile.SYMTYPE, "shop/run.sh"),
    special("hard", tarfile.LNKTYPE, "shop/run.sh"), special("hard2", tarfile.LNKTYPE, "/etc/passwd"),
    special("fifo", tarfile.FIFOTYPE), special("dev", tarfile.CHRTYPE), special("blk", tarfile.BLKTYPE),
], ids=lambda m: f"{m[0].name}:{m[0].type!r}")
def test_hostile_members_refused_naming_the_member(store, member):
    body = tgz([f("shop/ok.py"), member])
    msg = refused(store, body)
    assert repr(member[0].name) in msg
    assert leftovers(store) == []


def test_a_member_after_many_good_ones_is_still_found(store):
    body = tgz([f(f"shop/m{i}.py") for i in range(200)] + [f("../../evil")])
    assert "'../../evil'" in refused(store, body)


@pytest.mark.parametrize("body", [
    b"", b"not a tarball at all", gzip.compress(b"gzip, but no tar inside" * 10),
    gzip.compress(b"")[:-4] + b"\0\0\0\0",
], ids=["empty", "text", "gzip-not-tar", "bad-trailer"])
def test_unreadable_refused(store, body):
    assert "tar.gz" in refused(store, body)


def test_corrupt_gzip_refused(store):
    body = bytearray(good())
    for i in range(20, min(len(body) - 8, 60)):
        body[i] ^= 0xFF
    assert "tar.gz" in refused(store, bytes(body))
    assert leftovers(store) == []


def test_truncated_refused(store):
    body = tgz([f("shop/big.bin", os.urandom(200_000))])
    refused(store, body[: len(body) // 2])


def test_plain_tar_not_gzip_refused(store):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("a"), io.BytesIO(b""))
    refused(store, buf.getvalue())


class Endless:
    """A request body of `size` bytes, made as it is read, counting the reads."""

    def __init__(self, size: int):
        self.left = size
        self.read_bytes = 0
        self.block = b"\0" * (1024 * 1024)

    def read(self, n: int = -1) -> bytes:
        n = min(self.left, len(self.block) if n < 0 else n)
        self.left -= n
        self.read_bytes += n
        return self.block[:n]


def test_51_mib_stream_is_413_while_reading(store):
    body = Endless(51 * 1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(PackageError) as e:
            store.store("acme", "shop", body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.value.status == 413
    assert body.read_bytes <= pk.LIMIT + pk.CHUNK       # stopped just past the limit
    assert body.left > 0                                # the rest was never read
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes held while reading"
    assert leftovers(store) == []


def test_declared_length_over_the_limit_is_413_before_reading(store):
    body = Endless(10)
    with pytest.raises(PackageError) as e:
        store.store("acme", "shop", body, length=pk.LIMIT + 1)
    assert e.value.status == 413 and body.read_bytes == 0


def test_exactly_at_a_small_limit_is_accepted(store):
    body = good()
    assert store.store("acme", "shop", io.BytesIO(body), limit=len(body)).startswith("sha256:")
    refused(store, body, 413, limit=len(body) - 1)


def test_unpacked_size_is_bounded(store, monkeypatch):
    monkeypatch.setattr(pk, "UNPACKED_LIMIT", 1000)
    body = tgz([f("shop/zeros", b"\0" * 5000)])   # compresses to far less than 1000 bytes
    assert len(body) < 1000
    refused(store, body, 413)


def test_names_checked(store):
    for tenant, app in [("../x", "shop"), ("acme", "../x"), ("acme", "Shop"), ("", "shop")]:
        with pytest.raises(PackageError) as e:
            store.store(tenant, app, io.BytesIO(good()))
        assert e.value.status == 400
    for digest in ["sha256:../x", "abc", "sha256:" + "0" * 63]:
        with pytest.raises(PackageError):
            store.path("acme", "shop", digest)


def test_unpack(store, tmp_path):
    digest = store.store("acme", "shop", io.BytesIO(good()))
    dest = store.unpack("acme", "shop", digest, tmp_path / "run" / "v1")
    assert (dest / "shop" / "run.sh").read_text() == "#!/bin/sh\necho hi\n"
    assert os.access(dest / "shop" / "run.sh", os.X_OK)
    assert (dest / "shop" / "__init__.py").is_file() and (dest / "manifest.json").is_file()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["v1"]     # no work directory left
    with pytest.raises(FileExistsError):
        store.unpack("acme", "shop", digest, dest)
    with pytest.raises(PackageError) as e:
        store.unpack("acme", "shop", "sha256:" + "0" * 64, tmp_path / "run" / "v2")
    assert e.value.status == 404


def test_unpack_checks_again(store, tmp_path):
    """A stored file that was replaced by a hostile one is still refused, and
    nothing lands outside (or at) the destination."""
    digest = store.store("acme", "shop", io.BytesIO(good()))
    store.path("acme", "shop", digest).write_bytes(tgz([f("shop/a"), f("../escaped")]))
    with pytest.raises(PackageError):
        store.unpack("acme", "shop", digest, tmp_path / "run" / "v1")
    assert not (tmp_path / "run" / "escaped").exists() and not (tmp_path / "escaped").exists()
    assert list((tmp_path / "run").iterdir()) == []


def test_fallback_extraction(tmp_path):
    """The hand-written extraction for Pythons without tarfile.data_filter."""
    path = tmp_path / "p.tar.gz"
    path.write_bytes(good())
    root = tmp_path / "out"
    root.mkdir()
    with tarfile.open(path, "r:gz") as tar:
        for m in tar:
            pk.check_member(m)
            pk._extract_checked(tar, m, root)
    assert (root / "shop" / "run.sh").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.access(root / "shop" / "run.sh", os.X_OK)


def test_delete(store):
    store.store("acme", "shop", io.BytesIO(good()))
    store.delete("acme", "shop")
    assert not (store.root / "acme" / "shop").exists()
    store.delete("acme", "shop")   # twice is fine
