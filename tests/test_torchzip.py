"""The zip container engine and its integration in stateformat, on real torch.save files."""

from __future__ import annotations

import copy
import errno
import os
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from forgather_checkpoint import pickle_codec as pc
from forgather_checkpoint import stateformat, torchzip
from forgather_checkpoint.errors import StateFileError, ValidationError

from .test_pickle_codec import STATE_NAMES, real_states, save_to

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's storage bytes, for bit-for-bit comparison (not torch.equal)."""
    return bytes(tensor.untyped_storage())


def assert_same_tree(left: Any, right: Any, where: str = "$") -> None:
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor), where
        assert (left.dtype, left.shape, left.stride(), left.storage_offset()) == (
            right.dtype, right.shape, right.stride(), right.storage_offset()), where
        assert raw_bytes(left) == raw_bytes(right), where
    elif isinstance(left, dict):
        assert list(left) == list(right), where
        for key in left:
            assert_same_tree(left[key], right[key], f"{where}.{key}")
    elif isinstance(left, (list, tuple)):
        assert type(left) is type(right) and len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right)):
            assert_same_tree(a, b, f"{where}.{index}")
    elif isinstance(left, float) and left != left:
        assert right != right, where
    else:
        assert type(left) is type(right) and left == right, where


def data_offsets(path: Path) -> dict[str, int]:
    """Data offsets as Python's zipfile (an independent reader) computes them."""
    offsets = {}
    with open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
        for info in archive.infolist():
            handle.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(handle.read(2), "little"), int.from_bytes(
                handle.read(2), "little")
            offsets[info.filename] = info.header_offset + 30 + name_len + extra_len
    return offsets


def assert_storage_alignment(path: Path) -> None:
    for name, offset in data_offsets(path).items():
        if "/data/" in name:
            assert offset % 64 == 0, (name, offset)


def rewrite_root(source: Path, root: Any, target: Path) -> torchzip.RewriteReport:
    layout = torchzip.open_archive(source)
    data = pc.encode_pickle(root)
    report = torchzip.rewrite(layout, target, data)
    torchzip.verify_rewrite(target, layout, data, root)
    return report


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("states")
    return {name: save_to(real_states()[name], directory / f"{name}.pt") for name in STATE_NAMES}


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STATE_NAMES)
def test_unedited_rewrite_is_the_original_file(name: str, saved: dict[str, Path],
                                               tmp_path: Path) -> None:
    source = saved[name]
    layout = torchzip.open_archive(source)
    root = pc.decode_pickle(torchzip.read_pickle_bytes(layout))
    report = rewrite_root(source, root, tmp_path / "out.pt")
    assert report.shift == 0
    assert (tmp_path / "out.pt").read_bytes() == source.read_bytes()
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert_same_tree(torch.load(source, weights_only=True), loaded)
    mapped = torch.load(tmp_path / "out.pt", weights_only=True, mmap=True)
    assert_same_tree(loaded, mapped)


def test_layout_of_a_torch_file(saved: dict[str, Path]) -> None:
    layout = torchzip.open_archive(saved["adamw"])
    assert layout.prefix == "adamw"
    assert layout.pickle_record.name == "adamw/data.pkl"
    assert layout.alignment == 64
    assert not layout.pickle_compressed
    ours = {r.name: r.data_offset for r in layout.records}
    assert ours == data_offsets(saved["adamw"])
    with zipfile.ZipFile(saved["adamw"]) as archive:
        assert {i.filename: i.CRC for i in archive.infolist()} == {
            r.name: r.crc32 for r in layout.records}


def test_edit_lr_and_shared_betas(saved: dict[str, Path], tmp_path: Path) -> None:
    source = saved["adamw"]
    root = pc.decode_pickle(torchzip.read_pickle_bytes(torchzip.open_archive(source)))
    groups = root["param_groups"]
    assert groups[0]["betas"] is groups[1]["betas"]
    new_groups = [dict(groups[0], lr=5e-4, betas=(0.8, 0.95)), groups[1]]
    new_root = dict(root, param_groups=new_groups)  # copy-on-write, like the editor
    target = tmp_path / "edited.pt"
    report = rewrite_root(source, new_root, target)
    assert report.shift % 64 == 0
    assert_storage_alignment(target)

    before = torch.load(source, weights_only=True)
    after = torch.load(target, weights_only=True, mmap=True)
    expected = copy.deepcopy(before)
    expected["param_groups"][0]["lr"] = 5e-4
    expected["param_groups"][0]["betas"] = (0.8, 0.95)
    assert_same_tree(expected, after)
    assert after["param_groups"][1]["betas"] == (0.9, 0.95)


def test_edit_nested_sequential_scheduler(saved: dict[str, Path], tmp_path: Path) -> None:
    source = saved["sequential"]
    root = pc.decode_pickle(torchzip.read_pickle_bytes(torchzip.open_archive(source)))
    first = root["_schedulers"][0]
    new_first = dict(first, base_lrs=[lr * 0.5 for lr in first["base_lrs"]])
    new_root = dict(root, _schedulers=[new_first, *root["_schedulers"][1:]])
    rewrite_root(source, new_root, tmp_path / "s.pt")
    before = torch.load(source, weights_only=True)
    after = torch.load(tmp_path / "s.pt", weights_only=True)
    before["_schedulers"][0]["base_lrs"] = [lr * 0.5 for lr in before["_schedulers"][0][
        "base_lrs"]]
    assert_same_tree(before, after)


@settings(max_examples=25, deadline=None)
@given(padding=st.text(max_size=300),
       name=st.sampled_from(["adamw_fused", "shared_storage", "adagrad"]))
def test_any_pickle_growth_keeps_alignment(padding: str, name: str) -> None:
    source = _cached_file(name)
    root = pc.decode_pickle(torchzip.read_pickle_bytes(torchzip.open_archive(source)))
    new_root = dict(root, note=padding)
    target = source.with_name("grown.pt")
    rewrite_root(source, new_root, target)
    assert_storage_alignment(target)
    after = torch.load(target, weights_only=True, mmap=True)
    assert after.pop("note") == padding
    assert_same_tree(torch.load(source, weights_only=True), after)


def test_shrinking_the_pickle(saved: dict[str, Path], tmp_path: Path) -> None:
    source = saved["plain_edges"]
    root = pc.decode_pickle(torchzip.read_pickle_bytes(torchzip.open_archive(source)))
    small = {"ints": root["ints"]}
    rewrite_root(source, small, tmp_path / "small.pt")
    assert torch.load(tmp_path / "small.pt", weights_only=False) == {"ints": root["ints"]}
    assert (tmp_path / "small.pt").stat().st_size < source.stat().st_size


def test_rewrite_into_an_open_descriptor(saved: dict[str, Path], tmp_path: Path) -> None:
    layout = torchzip.open_archive(saved["sgd_momentum"])
    data = torchzip.read_pickle_bytes(layout)
    target = tmp_path / "fd.pt"
    target.write_bytes(b"stale bytes that must disappear" * 100)
    fd = os.open(target, os.O_RDWR)
    try:
        torchzip.rewrite(layout, fd, data)
    finally:
        os.close(fd)
    assert target.read_bytes() == saved["sgd_momentum"].read_bytes()


@pytest.mark.parametrize("broken", [("copy_file_range",), ("copy_file_range", "sendfile")])
def test_copy_fallbacks_produce_the_same_file(broken: tuple[str, ...], saved: dict[str, Path],
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(code: int) -> Any:
        def call(*args: Any) -> int:
            raise OSError(code, os.strerror(code))

        return call

    # what the kernel answers across filesystems / for files sendfile cannot handle
    codes = {"copy_file_range": errno.EXDEV, "sendfile": errno.EINVAL}
    for name in broken:
        monkeypatch.setattr(os, name, unsupported(codes[name]))
    monkeypatch.setattr(torchzip, "_BUFFER_CHUNK", 7)  # many small chunks
    layout = torchzip.open_archive(saved["shared_storage"])
    report = torchzip.rewrite(layout, tmp_path / "o.pt", torchzip.read_pickle_bytes(layout))
    assert report.copy_method == ("sendfile" if len(broken) == 1 else "buffered")
    assert (tmp_path / "o.pt").read_bytes() == saved["shared_storage"].read_bytes()


def test_zip64_structures_are_written_and_read(saved: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Lowering the limit makes every offset/size "large", exercising the zip64 code paths
    # (central-directory zip64 extras, 0xFFFFFFFF markers) without writing 4 GiB.
    source = saved["shared_storage"]
    layout = torchzip.open_archive(source)
    root = pc.decode_pickle(torchzip.read_pickle_bytes(layout))
    monkeypatch.setattr(torchzip, "ZIP64_LIMIT", 100)
    target = tmp_path / "z64.pt"
    new_root = dict(root, extra="x" * 77)
    rewrite_root(source, new_root, target)
    with zipfile.ZipFile(target) as archive:  # an independent reader
        assert archive.testzip() is None
        infos = archive.infolist()
        assert any(len(info.extra) >= 12 for info in infos)  # zip64 extra fields present
    monkeypatch.setattr(torchzip, "ZIP64_LIMIT", 0xFFFFFFFF)
    reread = torchzip.open_archive(target)
    assert [r.name for r in reread.records] == [r.name for r in layout.records]
    assert {r.name: r.data_offset for r in reread.records} == data_offsets(target)
    after = torch.load(target, weights_only=True, mmap=True)
    assert after.pop("extra") == "x" * 77
    assert_same_tree(torch.load(source, weights_only=True), after)


def test_reads_archives_with_zip64_local_headers(tmp_path: Path) -> None:
    path = tmp_path / "py64.pt"
    pickled = pc.encode_pickle({"lr": 0.1})
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in (("arc/data.pkl", pickled), ("arc/version", b"3\n")):
            with archive.open(zipfile.ZipInfo(name), "w", force_zip64=True) as member:
                member.write(data)
    layout = torchzip.open_archive(path)
    assert pc.decode_pickle(torchzip.read_pickle_bytes(layout)) == {"lr": 0.1}
    rewrite_root(path, {"lr": 0.2}, tmp_path / "out.pt")
    with zipfile.ZipFile(tmp_path / "out.pt") as archive:
        assert archive.read("arc/version") == b"3\n"
        assert pc.decode_pickle(archive.read("arc/data.pkl")) == {"lr": 0.2}


def test_compressed_pickle_is_flagged_and_stored_on_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a/data.pkl", pc.encode_pickle({"lr": 0.1} | {str(i): i for i in
                                                                       range(50)}),
                         compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr("a/version", b"3\n")
    layout = torchzip.open_archive(path)
    assert layout.pickle_compressed
    doc = stateformat.read_state_file(path)
    assert doc.root["lr"] == 0.1 and any("compressed" in note for note in doc.notes)
    new_root = dict(doc.root, lr=0.3)
    stateformat.write_state_file(doc, new_root, tmp_path / "out.pt")
    stateformat.verify_state_file(doc, tmp_path / "out.pt", new_root)
    assert not torchzip.open_archive(tmp_path / "out.pt").pickle_compressed


# --------------------------------------------------------------------------------------------
# Corrupt input
# --------------------------------------------------------------------------------------------


def test_empty_and_foreign_files(tmp_path: Path) -> None:
    cases = {"empty.pt": b"", "text.pt": b"hello, not a checkpoint\n" * 10,
             "onlyzipmagic.pt": b"PK\x03\x04" + b"\x00" * 40}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(StateFileError, match=name):
            stateformat.read_state_file(tmp_path / name)
    with zipfile.ZipFile(tmp_path / "nopkl.pt", "w") as archive:
        archive.writestr("a/other", b"x")
    with pytest.raises(StateFileError, match="data.pkl"):
        stateformat.read_state_file(tmp_path / "nopkl.pt")


@settings(max_examples=40, deadline=None)
@given(st.floats(0.0, 0.999))
def test_truncated_files_are_rejected(fraction: float) -> None:
    source = _cached_file("adamw")
    data = source.read_bytes()
    cut = source.with_name("cut.pt")
    cut.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(StateFileError):
        stateformat.read_state_file(cut)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_bit_flips_in_data_pkl_are_rejected(data: st.DataObject) -> None:
    source = _cached_file("adamw")
    layout = torchzip.open_archive(source)
    record = layout.pickle_record
    content = bytearray(source.read_bytes())
    index = data.draw(st.integers(record.data_offset, record.data_offset + record.compressed_size
                                  - 1))
    content[index] ^= 1 << data.draw(st.integers(0, 7))
    flipped = source.with_name("flip.pt")
    flipped.write_bytes(bytes(content))
    with pytest.raises(StateFileError, match="CRC"):
        stateformat.read_state_file(flipped)


_FILES: dict[str, Path] = {}


def _cached_file(name: str) -> Path:
    if name not in _FILES:
        import tempfile

        directory = Path(tempfile.mkdtemp(prefix="torchzip-test-"))
        _FILES[name] = save_to(real_states()[name], directory / f"{name}.pt")
    return _FILES[name]


def test_non_dict_top_level_and_unsafe_globals(tmp_path: Path) -> None:
    import os as os_module

    from .test_pickle_codec import _Exploit

    with pytest.raises(StateFileError, match="expected a dict"):
        stateformat.read_state_file(save_to([1, 2, 3], tmp_path / "list.pt"))
    marker = tmp_path / "pwned"
    path = save_to({"x": _Exploit(os_module.system, f"touch {marker}")}, tmp_path / "evil.pt")
    with pytest.raises(StateFileError, match="system"):
        stateformat.read_state_file(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# stateformat integration
# --------------------------------------------------------------------------------------------


def test_state_document_round_trip_and_verify(saved: dict[str, Path], tmp_path: Path) -> None:
    doc = stateformat.read_state_file(saved["adamw_fused"])
    assert doc.backend == "zip" and doc.notes == ()
    exp_avg = doc.root["state"][0]["exp_avg"]
    assert stateformat.is_opaque(exp_avg)
    assert stateformat.describe_opaque(exp_avg) == "tensor(float32, shape=[3, 4])"
    assert not stateformat.is_opaque(doc.root["param_groups"][0]["betas"])
    new_root = dict(doc.root, param_groups=[dict(doc.root["param_groups"][0], lr=0.123),
                                            *doc.root["param_groups"][1:]])
    target = tmp_path / "t.pt"
    target.touch()
    stateformat.write_state_file(doc, new_root, target)
    stateformat.verify_state_file(doc, target, new_root)
    loaded = stateformat.verify_load_with_torch(target)
    assert loaded["param_groups"][0]["lr"] == 0.123
    with pytest.raises(ValidationError):
        stateformat.verify_state_file(doc, target, doc.root)  # not what was written


def test_verify_catches_a_damaged_tensor_record(saved: dict[str, Path], tmp_path: Path) -> None:
    doc = stateformat.read_state_file(saved["adagrad"])
    target = tmp_path / "t.pt"
    stateformat.write_state_file(doc, doc.root, target)
    layout = torchzip.open_archive(target)
    victim = next(r for r in layout.records if "/data/" in r.name)
    content = bytearray(target.read_bytes())
    # damage the central directory's CRC of one storage record
    position = content.find(b"PK\x01\x02" + bytes(12), layout.cd_offset)
    entry = layout.cd_offset
    for record in layout.records:
        name_len = int.from_bytes(content[entry + 28:entry + 30], "little")
        extra_len = int.from_bytes(content[entry + 30:entry + 32], "little")
        comment_len = int.from_bytes(content[entry + 32:entry + 34], "little")
        if record.name == victim.name:
            position = entry + 16
            break
        entry += 46 + name_len + extra_len + comment_len
    content[position] ^= 0xFF
    target.write_bytes(bytes(content))
    with pytest.raises(ValidationError, match=victim.name):
        stateformat.verify_state_file(doc, target, doc.root)


def test_legacy_files_use_the_torch_path(tmp_path: Path) -> None:
    state = real_states()["sgd_momentum"]
    path = tmp_path / "legacy.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    with pytest.raises(torchzip.LegacyFormatError):
        torchzip.open_archive(path)
    doc = stateformat.read_state_file(path)
    assert doc.backend == "torch-legacy" and "legacy" in doc.notes[0]
    new_root = copy.deepcopy(doc.root)
    new_root["param_groups"][0]["lr"] = 0.01
    target = tmp_path / "legacy-out.pt"
    stateformat.write_state_file(doc, new_root, target)
    stateformat.verify_state_file(doc, target, new_root)
    assert not zipfile.is_zipfile(target)
    assert torch.load(target, weights_only=True)["param_groups"][0]["lr"] == 0.01


def test_reading_and_writing_zip_files_never_imports_torch(saved: dict[str, Path],
                                                          tmp_path: Path) -> None:
    script = f"""
import sys
from pathlib import Path
from forgather_checkpoint import stateformat
doc = stateformat.read_state_file(Path({str(saved['sequential'])!r}))
root = dict(doc.root, last_epoch=99)
out = Path({str(tmp_path / 'o.pt')!r})
stateformat.write_state_file(doc, root, out)
stateformat.verify_state_file(doc, out, root)
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert torch.load(tmp_path / "o.pt", weights_only=True)["last_epoch"] == 99


def test_crc_of_untouched_records_is_preserved(saved: dict[str, Path], tmp_path: Path) -> None:
    source = saved["shared_storage"]
    root = pc.decode_pickle(torchzip.read_pickle_bytes(torchzip.open_archive(source)))
    rewrite_root(source, dict(root, x=1), tmp_path / "o.pt")
    with zipfile.ZipFile(source) as before, zipfile.ZipFile(tmp_path / "o.pt") as after:
        for info in before.infolist():
            if info.filename.endswith("data.pkl"):
                continue
            data = after.read(info.filename)
            assert zlib.crc32(data) == info.CRC == after.getinfo(info.filename).CRC
