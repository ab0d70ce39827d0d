"""Fetching a file from a package index without pip (the sdist fallback): a file:// PEP 503 index."""

import hashlib

import pytest

from clada.calibrate.cache import FetchError, index_download


def simple_index(root, filename: str, data: bytes, digest: str | None = None) -> str:
    """A one-project PEP 503 HTML index under ``root``: its URL."""
    (root / "files").mkdir()
    (root / "files" / filename).write_bytes(data)
    (root / "simple" / "my-pkg").mkdir(parents=True)
    digest = digest or hashlib.sha256(data).hexdigest()
    (root / "simple" / "my-pkg" / "index.html").write_text(
        f'<html><body><a href="../../files/My_Pkg-1.0.tar.gz.other">x</a>'
        f'<a href="../../files/{filename}#sha256={digest}">{filename}</a></body></html>')
    return (root / "simple").as_uri()


def test_index_download_finds_the_normalised_name_and_checks_its_hash(tmp_path):
    data = b"not really a tarball" * 100
    index = simple_index(tmp_path, "My_Pkg-1.0.tar.gz", data)
    out = tmp_path / "out"
    path = index_download("my.pkg", "1.0", ".tar.gz", out, index=index)
    assert path == out / "My_Pkg-1.0.tar.gz" and path.read_bytes() == data
    with pytest.raises(FetchError, match="lists no my.pkg-2.0.tar.gz"):
        index_download("my.pkg", "2.0", ".tar.gz", out, index=index)


def test_index_download_refuses_a_wrong_hash_and_leaves_nothing(tmp_path):
    index = simple_index(tmp_path, "my_pkg-1.0.tar.gz", b"payload", digest="0" * 64)
    out = tmp_path / "out"
    with pytest.raises(FetchError, match="sha256 differs"):
        index_download("my-pkg", "1.0", ".tar.gz", out, index=index)
    assert not any(out.iterdir())


def test_a_failed_pip_download_is_one_line():
    from clada.calibrate.cache import pip_error
    stderr = ("WARNING: Location 'file:///x/simple/pkg/' is ignored: it is neither a file nor a directory.\n"
              "ERROR: Could not find a version that satisfies the requirement pkg==1.0 (from versions: 0.1)\n"
              "ERROR: No matching distribution found for pkg==1.0\n")
    assert pip_error(stderr) == "No matching distribution found for pkg==1.0"
    assert pip_error("something odd\nhappened\n") == "happened"
    assert pip_error("") == "pip gave no reason"
