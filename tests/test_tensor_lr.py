"""Learning rates stored as 0-d tensors are edited in place, keeping dtype and device tag.

torch 2.13 on CPU stores ``lr`` (and ``initial_lr``, and the scheduler's ``base_lrs`` and
``_last_lr``) as 0-d tensors whenever an optimizer is given ``lr=torch.tensor(...)``: the
for-loop implementation and ``fused=True`` both accept it (``foreach=True`` refuses a tensor lr
unless ``capturable=True``, and ``capturable=True`` only steps on an accelerator). Those are the
configurations used here, trained for real, saved with ``torch.save`` and edited through the
CLI; the edited files are then loaded with ``torch.load(weights_only=True)`` (and mmap) into a
real optimizer and scheduler.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler

from forgather_checkpoint import pickle_codec, stateformat, torchzip
from forgather_checkpoint.cli import checkpoint
from forgather_checkpoint.errors import ForbiddenEditError, ValidationError, ValueTypeError

from .helpers import assert_tensors_identical, assert_unchanged, snapshot, tensor_bytes, train_steps

BASE_LRS = (1e-3, 5e-4)
STEPS_BEFORE = 5
STEPS_AFTER = 12

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]

# name -> (factory, lr dtype). Each is a configuration torch 2.13 accepts on CPU with a tensor
# lr and that really steps.
OPTIMIZERS: dict[str, tuple[OptimizerFactory, torch.dtype]] = {
    "adamw_fused_float32": (
        lambda groups: torch.optim.AdamW(groups, fused=True, weight_decay=0.01), torch.float32),
    "adam_forloop_float64": (
        lambda groups: torch.optim.Adam(groups, foreach=False), torch.float64),
    "sgd_fused_bfloat16": (
        lambda groups: torch.optim.SGD(groups, momentum=0.9, fused=True), torch.bfloat16),
    "adagrad_fused_float16": (
        lambda groups: torch.optim.Adagrad(groups, fused=True), torch.float16),
}

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer, float], Any]] = {
    "lambda_warmup": lambda opt, f: lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1)
                                                                                / 4)),
    "cosine": lambda opt, f: lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-5 * f),
}


def _optimizer(name: str, lrs: Iterable[float] = BASE_LRS) -> torch.optim.Optimizer:
    factory, dtype = OPTIMIZERS[name]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    groups = [{"params": layer.parameters(), "lr": torch.tensor(lr, dtype=dtype)}
              for layer, lr in zip(model, lrs)]
    return factory(groups)


def _save_checkpoint(directory: Path, optimizer_name: str = "adamw_fused_float32",
                     scheduler_name: str = "lambda_warmup") -> Path:
    directory.mkdir(parents=True)
    optimizer = _optimizer(optimizer_name)
    scheduler = SCHEDULERS[scheduler_name](optimizer, 1.0)
    train_steps(optimizer, scheduler, STEPS_BEFORE)
    torch.save(optimizer.state_dict(), directory / "optimizer_state.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler_state.pt")
    return directory


def _load(path: Path, *, mmap: bool = False) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _run(*args: Any) -> Any:
    return CliRunner().invoke(checkpoint, [str(a) for a in args], catch_exceptions=False)


def _stored(value: float, dtype: torch.dtype) -> bytes:
    """What torch itself stores for ``torch.tensor(value, dtype=dtype)``."""
    return tensor_bytes(torch.tensor(value, dtype=dtype))


def _without(group: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in keys}


# --------------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------------


def test_list_shows_the_value_of_a_tensor_lr(tmp_path: Path) -> None:
    directory = _save_checkpoint(tmp_path / "checkpoint-5")
    result = _run("list", directory, "-c", "optimizer")
    assert result.exit_code == 0, result.output
    assert "  lr: tensor(float32, value=0.001)" in result.stdout
    assert "  lr: tensor(float32, value=0.0005)" in result.stdout

    result = _run("list", directory, "-c", "scheduler", "--json")
    assert result.exit_code == 0, result.output
    entries = {e["key"]: e["values"][0] for e in json.loads(result.stdout)["entries"]}
    assert entries["base_lrs.0"] == {"value": 0.001, "repr": "tensor(float32, value=0.001)",
                                     "type": "tensor", "files": ["scheduler_state.pt"]}


def test_list_shows_bfloat16_by_its_shortest_exact_literal(tmp_path: Path) -> None:
    directory = _save_checkpoint(tmp_path / "checkpoint-5", "sgd_fused_bfloat16")
    result = _run("list", directory, "-c", "optimizer", "--json")
    values = {(e["group"], e["key"]): e["values"][0]["value"]
              for e in json.loads(result.stdout)["entries"]}
    # bfloat16 holds 0.00099945068359375 for 1e-3; the literal shown reads back to those bits.
    shown = values[(0, "lr")]
    assert _stored(shown, torch.bfloat16) == _stored(1e-3, torch.bfloat16)
    assert len(repr(shown)) <= len("0.001")


# --------------------------------------------------------------------------------------------
# modify --set / --scale
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_modify_set_lr_keeps_the_tensor_and_every_other_byte(tmp_path: Path, name: str) -> None:
    directory = _save_checkpoint(tmp_path / "checkpoint-5", name)
    path = directory / "optimizer_state.pt"
    dtype = OPTIMIZERS[name][1]
    before = _load(path)

    result = _run("modify", directory, "-c", "optimizer", "--set", "lr=3e-4",
                  "--param-group", "0", "--force")
    assert result.exit_code == 0, result.output
    assert f"lr: tensor({str(dtype).removeprefix('torch.')}, value=" in result.stdout

    for after in (_load(path), _load(path, mmap=True)):
        lr = after["param_groups"][0]["lr"]
        assert isinstance(lr, torch.Tensor) and lr.dtype == dtype and lr.shape == ()
        assert tensor_bytes(lr) == _stored(3e-4, dtype)
        # Everything else, tensors included, is exactly as it was.
        assert_tensors_identical(before["state"], after["state"])
        assert_tensors_identical(_without(before["param_groups"][0], "lr", "params"),
                                 _without(after["param_groups"][0], "lr", "params"))
        assert_tensors_identical(before["param_groups"][1], after["param_groups"][1])
        assert after["param_groups"][0]["params"] == before["param_groups"][0]["params"]

    # A resume: the original config, then load_state_dict; the lr is still a tensor and steps.
    optimizer = _optimizer(name)
    optimizer.load_state_dict(_load(path))
    group_lr = optimizer.param_groups[0]["lr"]
    assert isinstance(group_lr, torch.Tensor) and group_lr.dtype == dtype
    assert tensor_bytes(group_lr) == _stored(3e-4, dtype)
    for param in optimizer.param_groups[0]["params"]:
        param.grad = torch.ones_like(param)
    optimizer.step()


def test_modify_scale_multiplies_in_the_tensors_dtype(tmp_path: Path) -> None:
    directory = _save_checkpoint(tmp_path / "checkpoint-5", "adam_forloop_float64")
    path = directory / "optimizer_state.pt"
    before = _load(path)["param_groups"]
    result = _run("modify", directory, "-c", "optimizer", "--scale", "initial_lr=0.1", "--force")
    assert result.exit_code == 0, result.output
    after = _load(path)["param_groups"]
    for old, new in zip(before, after):
        assert new["initial_lr"].dtype == torch.float64
        assert tensor_bytes(new["initial_lr"]) == _stored(float(old["initial_lr"]) * 0.1,
                                                          torch.float64)
        assert float(new["initial_lr"]) != float(old["initial_lr"])
        assert tensor_bytes(new["lr"]) == tensor_bytes(old["lr"])


def test_dry_run_json_gives_plain_numbers_and_writes_nothing(tmp_path: Path) -> None:
    directory = _save_checkpoint(tmp_path / "checkpoint-5")
    before = snapshot(directory)
    result = _run("modify", directory, "-c", "optimizer", "--set", "lr=2e-4", "--dry-run",
                  "--json")
    assert result.exit_code == 0, result.output
    changes = [c for f in json.loads(result.stdout)["files"] for c in f["changes"]]
    assert {(c["group"], c["key"], c["old"], c["new"]) for c in changes} == {
        (0, "lr", 0.001, 0.0002), (1, "lr", 0.0005, 0.0002)}
    assert_unchanged(directory, before)


def test_setting_the_value_it_already_has_changes_nothing(tmp_path: Path) -> None:
    directory = _save_checkpoint(tmp_path / "checkpoint-5")
    before = snapshot(directory)
    # 0.0010000000474974513 is float32(1e-3) exactly; so is 1e-3 after rounding.
    result = _run("modify", directory, "-c", "optimizer", "--set", "initial_lr=1e-3",
                  "--param-group", "0", "--force")
    assert result.exit_code == 0, result.output
    assert_unchanged(directory, before)


def test_a_value_the_dtype_cannot_hold_is_refused(tmp_path: Path) -> None:
    directory = _save_checkpoint(tmp_path / "checkpoint-5", "adagrad_fused_float16")
    before = snapshot(directory)
    result = _run("modify", directory, "-c", "optimizer", "--set", "lr=1e6", "--force")
    assert result.exit_code == 1
    assert "1000000.0 does not fit a float16 tensor" in result.stderr
    result = _run("modify", directory, "-c", "optimizer", "--set", "lr=True", "--force")
    assert result.exit_code == 1 and "True is not a number" in result.stderr
    assert_unchanged(directory, before)


# --------------------------------------------------------------------------------------------
# the lr command
# --------------------------------------------------------------------------------------------


def _resume(directory: Path, optimizer_name: str, scheduler_name: str) -> list[list[float]]:
    optimizer = _optimizer(optimizer_name)
    scheduler = SCHEDULERS[scheduler_name](optimizer, 1.0)
    optimizer.load_state_dict(_load(directory / "optimizer_state.pt", mmap=True))
    scheduler.load_state_dict(_load(directory / "scheduler_state.pt"))
    return train_steps(optimizer, scheduler, STEPS_AFTER)


@pytest.mark.parametrize("scheduler_name", sorted(SCHEDULERS))
@pytest.mark.parametrize("optimizer_name", ["adamw_fused_float32", "adam_forloop_float64"])
def test_lr_scale_lasts_like_a_run_that_used_it_from_the_start(
        tmp_path: Path, optimizer_name: str, scheduler_name: str) -> None:
    directory = _save_checkpoint(tmp_path / "checkpoint-5", optimizer_name, scheduler_name)
    before_state = _load(directory / "optimizer_state.pt")["state"]
    result = _run("lr", directory, "--scale", "0.1", "--force")
    assert result.exit_code == 0, result.output
    assert "base_lrs: [tensor(" in result.stdout

    optimizer = _optimizer(optimizer_name, [lr * 0.1 for lr in BASE_LRS])
    scheduler = SCHEDULERS[scheduler_name](optimizer, 0.1)
    expected = train_steps(optimizer, scheduler, STEPS_BEFORE + STEPS_AFTER)[STEPS_BEFORE:]
    actual = _resume(directory, optimizer_name, scheduler_name)
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        for group, (a, b) in enumerate(zip(got, want, strict=True)):
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0), (step, group, a, b)

    dtype = OPTIMIZERS[optimizer_name][1]
    edited = _load(directory / "optimizer_state.pt")
    scheduler_state = _load(directory / "scheduler_state.pt")
    for index, base in enumerate(BASE_LRS):
        assert edited["param_groups"][index]["initial_lr"].dtype == dtype
        # Bit for bit what the run configured with lr=torch.tensor(base * 0.1) stores.
        assert tensor_bytes(edited["param_groups"][index]["initial_lr"]) == _stored(base * 0.1,
                                                                                    dtype)
        assert tensor_bytes(scheduler_state["base_lrs"][index]) == _stored(base * 0.1, dtype)
    assert_tensors_identical(before_state, edited["state"])


def test_lr_set_moves_both_groups_to_the_new_base(tmp_path: Path) -> None:
    directory = _save_checkpoint(tmp_path / "checkpoint-5")
    result = _run("lr", directory, "--set", "3e-4", "--force")
    assert result.exit_code == 0, result.output
    groups = _load(directory / "optimizer_state.pt")["param_groups"]
    base_lrs = _load(directory / "scheduler_state.pt")["base_lrs"]
    for group, base in zip(groups, base_lrs, strict=True):
        assert tensor_bytes(group["initial_lr"]) == _stored(3e-4, torch.float32)
        assert tensor_bytes(base) == _stored(3e-4, torch.float32)


# --------------------------------------------------------------------------------------------
# device tag, sharing, what is refused
# --------------------------------------------------------------------------------------------


def _rewrite_pickle(path: Path, edit: Callable[[Any], None]) -> None:
    """Change the pickle of a torch.save file with the codec (the tensor bytes are copied)."""
    layout = torchzip.open_archive(path)
    root = pickle_codec.decode_pickle(torchzip.read_pickle_bytes(layout))
    edit(root)
    temp = path.with_name(path.name + ".new")
    torchzip.rewrite(layout, temp, pickle_codec.encode_pickle(root))
    os.replace(temp, path)


def _storage_pid(node: Any) -> tuple[Any, ...]:
    assert isinstance(node, pickle_codec.TensorRebuild)
    return tuple(node.args[0].pid)


def test_a_cuda_device_tag_survives_the_edit(tmp_path: Path) -> None:
    directory = _save_checkpoint(tmp_path / "checkpoint-5")
    path = directory / "optimizer_state.pt"

    def to_cuda(root: Any) -> None:
        # What a GPU run saves: the storage's location tag is "cuda:0" (we have no GPU).
        node = root["param_groups"][0]["lr"]
        pid = _storage_pid(node)
        node.args = (pickle_codec.PersistentRef((*pid[:3], "cuda:0", *pid[4:])), *node.args[1:])

    _rewrite_pickle(path, to_cuda)
    listed = _run("list", directory, "-c", "optimizer")
    assert "lr: tensor(float32, value=0.001)" in listed.stdout

    result = _run("modify", directory, "-c", "optimizer", "--set", "lr=7e-4",
                  "--param-group", "0", "--force")
    assert result.exit_code == 0, result.output
    root = stateformat.read_state_file(path).root
    lr = root["param_groups"][0]["lr"]
    assert _storage_pid(lr)[3] == "cuda:0"
    assert lr.scalar is not None and lr.scalar.location == "cuda:0" and lr.scalar.text == "0.0007"
    assert _storage_pid(root["param_groups"][1]["lr"])[3] == "cpu"
    loaded = _load(path)  # map_location="cpu" turns the cuda tag into a CPU tensor
    assert tensor_bytes(loaded["param_groups"][0]["lr"]) == _stored(7e-4, torch.float32)


def _save_optimizer_with(directory: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    directory.mkdir(parents=True)
    optimizer = _optimizer("adamw_fused_float32")
    scheduler = SCHEDULERS["lambda_warmup"](optimizer, 1.0)
    train_steps(optimizer, scheduler, 2)
    state = optimizer.state_dict()
    change(state["param_groups"][0])
    torch.save(state, directory / "optimizer_state.pt")
    return directory


def _same_object(group: dict[str, Any]) -> None:
    group["initial_lr"] = group["lr"]


def _shared_storage(group: dict[str, Any]) -> None:
    both = torch.tensor([1e-3, 1e-3])
    group["lr"], group["initial_lr"] = both[0], both[1]


@pytest.mark.parametrize(("change", "reason"), [
    (_same_object, "the same tensor object is used at 2 places in this file"),
    (_shared_storage, "its storage is shared with another tensor in this file"),
])
@pytest.mark.parametrize("command", [
    ["modify", "-c", "optimizer", "--set", "lr=1e-4"],
    ["modify", "-c", "optimizer", "--scale", "lr=2"],
    ["lr", "--scale", "0.5"],
])
def test_a_tensor_sharing_its_bytes_is_refused_and_nothing_changes(
        tmp_path: Path, change: Callable[[dict[str, Any]], None], reason: str,
        command: list[str]) -> None:
    directory = _save_optimizer_with(tmp_path / "checkpoint-2", change)
    before = snapshot(directory)
    result = _run(command[0], directory, *command[1:], "--force")
    assert result.exit_code == 1
    assert reason in result.stderr and "left alone" in result.stderr
    assert "Traceback" not in result.output
    assert_unchanged(directory, before)


def test_a_tensor_of_several_elements_is_refused(tmp_path: Path) -> None:
    def vector_lr(group: dict[str, Any]) -> None:
        group["lr"] = torch.tensor([1e-3, 2e-3])

    directory = _save_optimizer_with(tmp_path / "checkpoint-2", vector_lr)
    before = snapshot(directory)
    result = _run("modify", directory, "-c", "optimizer", "--set", "lr=1e-4", "--force")
    assert result.exit_code == 1
    assert "tensor(float32, shape=[2]); tensors are not edited by this tool, except a tensor " \
           "of one element" in result.stderr
    assert_unchanged(directory, before)


# --------------------------------------------------------------------------------------------
# the format layer: rounding like torch, patches at the byte level
# --------------------------------------------------------------------------------------------

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
          torch.int32, torch.int16, torch.int8, torch.uint8)


@pytest.fixture(scope="module")
def scalar_nodes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("scalars") / "scalars.pt"
    torch.save({str(dtype): torch.tensor(1, dtype=dtype) for dtype in DTYPES}, path)
    return dict(stateformat.read_state_file(path).root)


@settings(max_examples=300, deadline=None)
@given(value=st.floats(allow_nan=False, allow_infinity=True))
def test_float_elements_round_exactly_like_torch(scalar_nodes: dict[str, Any],
                                                 value: float) -> None:
    for dtype in DTYPES[:4]:
        expected = _stored(value, dtype)
        finite = math.isfinite(value)
        if finite and not math.isfinite(torch.tensor(value, dtype=dtype).item()):
            with pytest.raises(ValueTypeError, match="does not fit"):
                stateformat.set_tensor_scalar(scalar_nodes[str(dtype)], value, "lr")
            continue
        edit = stateformat.set_tensor_scalar(scalar_nodes[str(dtype)], value, "lr")
        assert edit.scalar.raw == expected, (dtype, value)
        # What list shows reads back to the same bits.
        assert _stored(edit.scalar.display_value, dtype) == expected, (dtype, value)


@settings(max_examples=100, deadline=None)
@given(value=st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_integer_elements_are_stored_like_torch_or_refused(scalar_nodes: dict[str, Any],
                                                            value: int) -> None:
    for dtype in DTYPES[4:]:
        info = torch.iinfo(dtype)
        node = scalar_nodes[str(dtype)]
        if info.min <= value <= info.max:
            assert stateformat.set_tensor_scalar(node, value, "k").scalar.raw == _stored(
                value, dtype)
        else:
            with pytest.raises(ValueTypeError, match="does not fit"):
                stateformat.set_tensor_scalar(node, value, "k")


def test_integer_elements_need_whole_numbers(scalar_nodes: dict[str, Any]) -> None:
    with pytest.raises(ValueTypeError, match="not a whole number"):
        stateformat.set_tensor_scalar(scalar_nodes["torch.int64"], 1.5, "k")
    with pytest.raises(ValueTypeError, match="is not whole"):
        stateformat.scale_tensor_scalar(scalar_nodes["torch.int64"], 0.5, "k")
    assert stateformat.scale_tensor_scalar(scalar_nodes["torch.int64"], 3.0, "k").scalar.value == 3


def _edited_archive(tmp_path: Path) -> tuple[Path, torchzip.ArchiveLayout, dict[str, bytes]]:
    source = _save_checkpoint(tmp_path / "checkpoint-5") / "optimizer_state.pt"
    doc = stateformat.read_state_file(source)
    node = doc.root["param_groups"][0]["lr"]
    layout = doc.private["layout"]
    name = f"{layout.prefix}/data/{node.scalar.storage_key}"
    return source, layout, {name: struct.pack("<f", 0.25)}


def test_a_patch_changes_only_the_data_and_its_crcs(tmp_path: Path) -> None:
    source, layout, patches = _edited_archive(tmp_path)
    written = tmp_path / "written.pt"
    pickle_bytes = torchzip.read_pickle_bytes(layout)
    report = torchzip.rewrite(layout, written, pickle_bytes, patches)
    torchzip.verify_rewrite(written, layout, pickle_bytes, patches=patches)

    old, new = source.read_bytes(), written.read_bytes()
    assert report.size == len(old) == len(new) and report.shift == 0
    (name, data), = patches.items()
    record = torchzip.record_named(layout, name)
    assert record is not None
    old_crc, new_crc = struct.pack("<I", record.crc32), struct.pack("<I", zlib.crc32(data))
    differing = [i for i in range(len(old)) if old[i] != new[i]]
    data_range = range(record.data_offset, record.data_offset + record.compressed_size)
    crc_places = [i for i in range(len(new) - 3) if new[i:i + 4] == new_crc]
    allowed = set(data_range).union(*(range(i, i + 4) for i in crc_places))
    assert differing and set(differing) <= allowed
    assert all(old[i:i + 4] == old_crc for i in crc_places)
    assert len(crc_places) >= 2  # the data descriptor and the central directory entry
    with zipfile.ZipFile(written) as archive:  # an independent reader checks every CRC
        assert archive.testzip() is None
        assert archive.read(name) == data
    loaded = _load(written)
    assert float(loaded["param_groups"][0]["lr"]) == 0.25


def test_verification_catches_a_patch_that_did_not_land(tmp_path: Path) -> None:
    _, layout, patches = _edited_archive(tmp_path)
    written = tmp_path / "written.pt"
    pickle_bytes = torchzip.read_pickle_bytes(layout)
    torchzip.rewrite(layout, written, pickle_bytes, patches)
    (name, data), = patches.items()
    with pytest.raises(ValidationError, match="intended bytes|lacks the intended patch"):
        torchzip.verify_rewrite(written, layout, pickle_bytes,
                                patches={name: struct.pack("<f", 0.5)})
    # Without the patch, the record's new CRC no longer matches the original's.
    with pytest.raises(ValidationError, match="changed size, CRC or compression"):
        torchzip.verify_rewrite(written, layout, pickle_bytes)


def test_a_patch_must_keep_the_record_size(tmp_path: Path) -> None:
    _, layout, patches = _edited_archive(tmp_path)
    (name, data), = patches.items()
    pickle_bytes = torchzip.read_pickle_bytes(layout)
    with pytest.raises(torchzip.TorchZipError, match="must keep the size"):
        torchzip.rewrite(layout, tmp_path / "x.pt", pickle_bytes, {name: data + b"\0"})
    with pytest.raises(torchzip.TorchZipError, match="pickle record"):
        torchzip.rewrite(layout, tmp_path / "x.pt", pickle_bytes,
                         {layout.pickle_record.name: pickle_bytes})


def test_stateformat_refuses_a_hand_built_edit_of_a_shared_tensor(tmp_path: Path) -> None:
    directory = _save_optimizer_with(tmp_path / "checkpoint-2", _same_object)
    doc = stateformat.read_state_file(directory / "optimizer_state.pt")
    node = doc.root["param_groups"][0]["lr"]
    assert node.scalar is not None and node.scalar.shared is not None
    with pytest.raises(ForbiddenEditError, match="left alone"):
        stateformat.set_tensor_scalar(node, 1e-4, "lr")
    # Even a marker built around the check is refused when the file is written.
    forged = pickle_codec.ScalarTensorEdit(node, node.scalar)
    new_root = dict(doc.root)
    new_root["param_groups"] = [dict(doc.root["param_groups"][0], lr=forged),
                                *doc.root["param_groups"][1:]]
    target = tmp_path / "out.pt"
    target.touch()
    with pytest.raises(ForbiddenEditError, match="used elsewhere"):
        stateformat.write_state_file(doc, new_root, target)


@pytest.mark.parametrize("change", [_same_object, _shared_storage, lambda group: None])
def test_usage_counted_while_decoding_matches_a_walk_of_the_tree(
        tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    directory = _save_optimizer_with(tmp_path / "checkpoint-2", change)
    layout = torchzip.open_archive(directory / "optimizer_state.pt")
    decoded = pickle_codec.decode_pickle_info(torchzip.read_pickle_bytes(layout))
    walked = pickle_codec.tensor_usage(decoded.root)
    assert decoded.usage.storage_refs == walked.storage_refs
    assert decoded.usage.tensor_refs == walked.tensor_refs
    assert {id(t) for t in decoded.usage.tensors} == {id(t) for t in walked.tensors}


def test_diff_shows_the_edited_tensor_lr(tmp_path: Path) -> None:
    original = _save_checkpoint(tmp_path / "a" / "checkpoint-5")
    edited = _save_checkpoint(tmp_path / "b" / "checkpoint-5")
    assert _run("modify", edited, "-c", "optimizer", "--set", "lr=2e-4", "--param-group", "1",
                "--force").exit_code == 0
    result = _run("diff", original, edited)
    assert result.exit_code == 1
    assert ("lr: tensor(float32, value=0.0005) -> tensor(float32, value=0.0002)"
            in result.stdout)
    assert result.stdout.count(" -> ") == 1
