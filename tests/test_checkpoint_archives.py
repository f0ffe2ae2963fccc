""".nemo archives as untrusted input: unsafe members, the size caps, and extraction on Pythons without tarfile's
"data" filter (PEP 706: 3.10.12 / 3.11.4 and later, or a vendor backport).

Every test runs twice where it matters: with this Python's tarfile, and with tarfile as it was before PEP 706 (no
`data_filter`, an `extractall` that takes no `filter` and trusts the archive fully).
"""

from __future__ import annotations

import io
import stat
import tarfile
import time
from collections import namedtuple
from pathlib import Path

import pytest

from builder.checkpoints import CheckpointError, convert
from builder.checkpoints import nemo as nemo_module
from builder.checkpoints.nemo import extract_nemo


@pytest.fixture(params=["data_filter", "before_pep706"])
def tarfile_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "before_pep706":
        original = tarfile.TarFile.extractall

        def extractall(self: tarfile.TarFile, path: str | Path = ".", members: object = None, *,
                       numeric_owner: bool = False) -> None:  # the old signature: passing filter= is a TypeError
            original(self, path, members, numeric_owner=numeric_owner, filter="fully_trusted")

        monkeypatch.delattr(tarfile, "data_filter")
        monkeypatch.setattr(tarfile.TarFile, "extractall", extractall)
    return request.param


def bin_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("model.*.bin"))}


def _tar_with(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("model_config.yaml")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"a: 1"[:3]))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "", mode: int = 0o644
          ) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mode = kind, size, link, mode
    return info


# ---- unsafe members --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("member", "message"), [
    ((_info("../escape.txt", size=2), b"hi"), "escapes the extraction folder"),
    ((_info("/etc/evil.txt", size=2), b"hi"), "absolute path"),
    ((_info("vocab.json", tarfile.SYMTYPE, link="/etc/passwd"), None), "symbolic link to '/etc/passwd'"),
    ((_info("merges.txt", tarfile.LNKTYPE, link="model_config.yaml"), None), "hard link"),
    ((_info("dev", tarfile.CHRTYPE), None), "device"),
    ((_info("fifo", tarfile.FIFOTYPE), None), "FIFO"),
    ((_info("model_weights.ckpt", size=65 * 2**30), None), "64 GiB limit per member"),
    ((_info("./model_config.yaml", size=2), b"b:"), "duplicate member name"),
])
def test_unsafe_archive_members_are_refused(tmp_path: Path, tarfile_kind: str,
                                            member: tuple[tarfile.TarInfo, bytes | None], message: str) -> None:
    archive = _tar_with(tmp_path / "bad.nemo", member)
    with pytest.raises(CheckpointError, match=message) as caught:
        convert(archive, tmp_path / "out", progress=False)
    assert "refusing to extract" in caught.value.message
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "1-gpu").exists()


# ---- extraction without tarfile's "data" filter ----------------------------------------------------------------


def test_nemo_converts_without_tarfile_data_filter(tiny_nemo: Path, tiny_ft_dir: Path,
                                                   tmp_path: Path, tarfile_kind: str) -> None:
    converted = convert(tiny_nemo, tmp_path / "ft", weight_data_type="fp16", progress=False)
    assert bin_files(converted) == bin_files(tiny_ft_dir)


def test_extracted_files_never_keep_the_archive_modes(tmp_path: Path, tarfile_kind: str) -> None:
    archive = _tar_with(tmp_path / "modes.nemo", (_info("setuid.bin", size=4, mode=0o6777), b"\x7fELF"),
                        (_info("sub", tarfile.DIRTYPE, mode=0o777), None),
                        (_info("sub/unreadable.txt", size=2, mode=0o000), b"hi"))
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_nemo(archive, dest)
    for path, data in ((dest / "setuid.bin", b"\x7fELF"), (dest / "sub" / "unreadable.txt", b"hi")):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH), oct(mode)
        assert path.read_bytes() == data  # readable by its owner, whatever the archive said


# ---- size caps -------------------------------------------------------------------------------------------------


def _sparse_tar(path: Path, sizes: list[int]) -> Path:
    """A tar whose headers claim `sizes` but whose data are holes (a sparse file: no disk used). It ends right after
    the last header, so a reader that goes on past it finds the archive truncated."""
    with open(path, "wb") as handle:
        offset = 0
        for rank, size in enumerate(sizes):
            info = tarfile.TarInfo(f"mp_rank_{rank:02d}/model_weights.ckpt")
            info.size = size
            header = info.tobuf(format=tarfile.GNU_FORMAT)  # GNU base-256 sizes: one 512-byte block each
            handle.seek(offset)
            handle.write(header)
            offset += len(header) + -(-size // 512) * 512
    return path


def _disk_with_free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(nemo_module.shutil, "disk_usage", lambda path: usage(free + 10**6, 10**6, free))


def test_members_adding_up_past_the_total_cap_are_refused_before_extracting(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _disk_with_free(monkeypatch, 2**50)  # a PiB free: the cap, not the disk, is what refuses
    archive = _sparse_tar(tmp_path / "huge.nemo", [60 * 2**30] * 5)  # each under the 64 GiB member cap: 300 GiB
    dest = tmp_path / "dest"
    dest.mkdir()
    started = time.monotonic()
    try:
        with pytest.raises(CheckpointError) as caught:
            extract_nemo(archive, dest)
    finally:
        archive.unlink()  # only holes, but its apparent size (240 GiB) would outlive the test in pytest's tmp
    assert time.monotonic() - started < 5
    assert caught.value.message == (
        f"{archive}: refusing to extract: the members up to 'mp_rank_04/model_weights.ckpt' add up to "
        f"{300 * 2**30} bytes (300 GiB), more than the {256 * 2**30} bytes (256 GiB) limit for a whole .nemo")
    assert list(dest.iterdir()) == []


def test_total_cap_is_a_module_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _tar_with(tmp_path / "small.nemo", (_info("a.bin", size=600), b"a" * 600),
                        (_info("b.bin", size=600), b"b" * 600))
    monkeypatch.setattr(nemo_module, "MAX_TOTAL_BYTES", 1000)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(CheckpointError, match=r"members up to 'b.bin' add up to 1203 bytes, more than the 1000 "
                                              r"bytes limit for a whole \.nemo"):
        extract_nemo(archive, dest)
    assert list(dest.iterdir()) == []
    with pytest.raises(CheckpointError, match="limit for a whole .nemo"):
        convert(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "1-gpu").exists()
    extract_nemo(archive, dest, max_total_bytes=2000)  # the limit is a parameter too
    assert (dest / "b.bin").read_bytes() == b"b" * 600


def test_archive_larger_than_the_free_space_is_refused(tiny_nemo: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _disk_with_free(monkeypatch, 5000)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(CheckpointError, match=rf"the members up to '.+' add up to \d+ bytes, more than the 5000 "
                                              rf"bytes free in {dest}$"):
        extract_nemo(tiny_nemo, dest)
    assert list(dest.iterdir()) == []
