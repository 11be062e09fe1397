"""Rewrites keep copied records page-congruent, so the kernel copies whole pages (and
copy-on-write filesystems can share blocks instead of copying them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from forgather_checkpoint import pickle_codec, torchzip

PAGE = 4096


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    import torch

    path = tmp_path / "optimizer_state_rank_0.pt"
    state = {
        "state": {i: {"step": torch.tensor(3.0), "exp_avg": torch.randn(5000)} for i in range(6)},
        "param_groups": [{"lr": 1e-3, "params": list(range(6))}],
    }
    torch.save(state, path)
    return path


@pytest.mark.parametrize("growth", [0, 1, 63, 64, 1000, 5000])
def test_copied_records_move_by_whole_pages(saved: Path, tmp_path: Path, growth: int) -> None:
    layout = torchzip.open_archive(saved)
    root = pickle_codec.decode_pickle(torchzip.read_pickle_bytes(layout))
    root = dict(root, note="x" * growth)  # the pickle grows by an arbitrary number of bytes
    target = tmp_path / "out.pt"
    encoded = pickle_codec.encode_pickle(root, protocol=2)
    report = torchzip.rewrite(layout, target, encoded)
    assert report.shift % PAGE == 0
    after = {r.name: r for r in torchzip.open_archive(target).records}
    for record in layout.records:
        if record is not layout.pickle_record:
            assert (after[record.name].data_offset - record.data_offset) % PAGE == 0
    torchzip.verify_rewrite(target, layout, encoded, root)  # 64-byte alignment, CRCs, values


def test_first_copy_call_stops_at_a_block_boundary(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    real = os.copy_file_range

    def spy(src: int, dst: int, count: int, offset_src: int | None = None,
            offset_dst: int | None = None) -> int:
        calls.append((offset_src or 0, count))
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(torchzip.os, "copy_file_range", spy)
    layout = torchzip.open_archive(saved)
    data = torchzip.read_pickle_bytes(layout)
    report = torchzip.rewrite(layout, tmp_path / "out.pt", data)
    assert report.copy_method == "copy_file_range" and calls
    start, count = calls[0]
    # Either the head up to the boundary alone, or a run that starts on one already.
    assert start % PAGE == 0 or (start + count) % PAGE == 0
    assert all(offset % PAGE == 0 for offset, _ in calls[1:])
    assert (tmp_path / "out.pt").read_bytes() == saved.read_bytes()  # nothing edited: same bytes
