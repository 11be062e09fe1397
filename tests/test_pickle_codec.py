"""The pickle codec on real torch state dicts, hostile pickles and generated data."""

from __future__ import annotations

import contextlib
import functools
import io
import math
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgather_checkpoint import pickle_codec as pc
from forgather_checkpoint.errors import StateFileError

# --------------------------------------------------------------------------------------------
# Real states (shared with test_torchzip)
# --------------------------------------------------------------------------------------------


def _trained_optimizer(factory: Any, *, groups: bool = True, steps: int = 2) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    decay = [model[0].weight, model[2].weight]
    no_decay = [model[0].bias, model[2].bias]
    params: Any = ([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
                   if groups else list(model.parameters()))
    optimizer = factory(params)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
    return optimizer.state_dict()


def _scheduler_state(kind: str) -> dict[str, Any]:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(
        [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.05}], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler
    if kind == "lambda":
        scheduler: Any = sched.LambdaLR(optimizer, [lambda s: 0.9 ** s, lambda s: 1.0])
    elif kind == "onecycle":
        scheduler = sched.OneCycleLR(optimizer, max_lr=[0.1, 0.05], total_steps=20)
    elif kind == "sequential":
        scheduler = sched.SequentialLR(optimizer, [
            sched.LinearLR(optimizer, start_factor=0.1, total_iters=3),
            sched.CosineAnnealingLR(optimizer, T_max=10)], milestones=[3])
    elif kind == "plateau":
        scheduler = sched.ReduceLROnPlateau(optimizer, patience=1)
    else:
        scheduler = sched.CosineAnnealingLR(optimizer, T_max=7, eta_min=1e-5)
    for step in range(4):
        optimizer.step()
        scheduler.step(1.0 / (step + 1)) if kind == "plateau" else scheduler.step()
    return scheduler.state_dict()


def _shared_storage_state() -> dict[str, Any]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "base": base,
        "same": base,  # the same tensor twice
        "view": base[1:3, 2:],  # offset + strides into the same storage
        "transposed": base.t(),
        "flat": base.view(-1),
        "bf16": torch.ones(3, dtype=torch.bfloat16),
        "ints": torch.tensor([1, -2, 3], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "rng": torch.get_rng_state(),
        "u16": torch.tensor([1, 2], dtype=torch.uint16),
        "param": torch.nn.Parameter(torch.zeros(2, 2)),
        "device": torch.device("cpu"),
        "dtype": torch.float16,
    }


def _plain_edge_state() -> dict[str, Any]:
    odd_keys = {str(i % 10): i for i in range(30)}
    return {
        "ints": [0, 1, 255, 256, 65535, 65536, -1, -(2**31), 2**31 - 1, 2**31, -(2**31) - 1,
                 2**63, -(2**64), 10**40],
        "floats": [0.0, -0.0, 1e-300, math.inf, -math.inf, 3.5],
        "text": ["", "a", "a", "", "é", "日本", "x" * 300, "\ud800"],
        "odd_keys": odd_keys,
        "big_list": list(range(2500)),
        "big_dict": {i: str(i) for i in range(1500)},
        "one": [1],
        "one_dict": {"k": None},
        "tuples": [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), ((),)],
        "flags": (True, False, None),
        "ordered": OrderedDict([("b", 1), ("a", OrderedDict())]),
        "blob": b"\x00\xffbytes",
        "set": {1, 2},
    }


@functools.lru_cache(maxsize=1)
def real_states() -> dict[str, Any]:
    """Name -> a state object saved by torch.save in the tests."""
    optim = torch.optim
    return {
        "adamw": _trained_optimizer(lambda p: optim.AdamW(p, lr=1e-3, betas=(0.9, 0.95))),
        "adamw_foreach": _trained_optimizer(lambda p: optim.AdamW(p, lr=1e-3, foreach=True)),
        "adamw_fused": _trained_optimizer(lambda p: optim.AdamW(p, lr=1e-3, fused=True)),
        "adamw_amsgrad": _trained_optimizer(
            lambda p: optim.AdamW(p, amsgrad=True, foreach=False), groups=False),
        "adam_tensor_lr": _trained_optimizer(
            lambda p: optim.Adam(p, lr=torch.tensor(0.01), fused=True)),
        "sgd_momentum": _trained_optimizer(lambda p: optim.SGD(p, lr=0.1, momentum=0.9)),
        "sgd_nesterov_foreach": _trained_optimizer(
            lambda p: optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, foreach=True)),
        "adagrad": _trained_optimizer(lambda p: optim.Adagrad(p, lr=0.01)),
        "lambda_lr": _scheduler_state("lambda"),
        "onecycle": _scheduler_state("onecycle"),
        "sequential": _scheduler_state("sequential"),
        "plateau": _scheduler_state("plateau"),
        "cosine": _scheduler_state("cosine"),
        "shared_storage": _shared_storage_state(),
        "plain_edges": _plain_edge_state(),
        "trainer": {"global_step": 10, "epoch_start_step": 0, "raw_epoch": 0.25,
                    "num_input_tokens_seen": 123456789012, "total_flos": 1.5e15},
    }


def save_to(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


def pickle_bytes_of(obj: Any) -> bytes:
    """The data.pkl record torch.save writes for ``obj``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return archive.read(name)


STATE_NAMES = sorted(real_states())


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STATE_NAMES)
def test_real_state_round_trips_byte_for_byte(name: str) -> None:
    data = pickle_bytes_of(real_states()[name])
    root = pc.decode_pickle(data)
    assert pc.encode_pickle(root) == data
    assert pc.weights_only_violation(root, pc.decode_pickle_info(data).opcodes) is None
    info = pc.decode_pickle_info(data)
    # Globals and storages collected while decoding are exactly what a walk finds.
    assert set(info.globals_named) == pc.referenced_globals(info.root)
    assert pc.weights_only_violation(info.root, decoded=info) is None


def test_shared_betas_tuple_stays_one_object() -> None:
    root = pc.decode_pickle(pickle_bytes_of(real_states()["adamw"]))
    groups = root["param_groups"]
    assert groups[0]["betas"] == (0.9, 0.95)
    assert groups[0]["betas"] is groups[1]["betas"]


def test_ordered_dict_decodes_as_a_mapping() -> None:
    root = pc.decode_pickle(pickle_bytes_of(real_states()["plain_edges"]))
    ordered = root["ordered"]
    assert isinstance(ordered, pc.PickledOrderedDict)
    assert list(ordered) == ["b", "a"] and ordered["b"] == 1
    ordered["c"] = 2  # editable like any mapping, and re-encoded as an OrderedDict
    again = pc.decode_pickle(pc.encode_pickle(root))
    assert list(again["ordered"].items())[-1] == ("c", 2)


def test_plain_values_decode_to_plain_python() -> None:
    state = real_states()["plain_edges"]
    root = pc.decode_pickle(pickle_bytes_of(state))
    for key in ("ints", "text", "big_list", "big_dict", "odd_keys", "tuples", "flags", "blob"):
        assert root[key] == state[key], key
    assert [math.copysign(1, f) for f in root["floats"]] == [
        math.copysign(1, f) for f in state["floats"]]


def test_empty_bytes_is_flagged_like_torch_does(tmp_path: Path) -> None:
    # CPython pickles b"" at protocol 2 as __builtin__.bytes(), which weights_only refuses.
    path = save_to({"blob": b""}, tmp_path / "b.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    root = pc.decode_pickle(pickle_bytes_of({"blob": b""}))
    assert root == {"blob": b""}
    assert "__builtin__.bytes" in (pc.weights_only_violation(root) or "")
    assert pc.encode_pickle(root) == pickle_bytes_of({"blob": b""})


def test_separate_single_character_strings_stay_separate() -> None:
    # What a pickler writes for two distinct "a" objects (e.g. from another Python) plus a
    # memo reference to the first: CPython's decoder would merge all three into one object.
    data = (b"\x80\x02]q\x00(X\x01\x00\x00\x00aq\x01X\x01\x00\x00\x00aq\x02"
            b"X\x00\x00\x00\x00q\x03X\x00\x00\x00\x00q\x04h\x01e.")
    root = pc.decode_pickle(data)
    assert root == ["a", "a", "", "", "a"]
    assert root[0] is root[4] and root[0] is not root[1]
    assert pc.encode_pickle(root) == data


def test_tensor_descriptions() -> None:
    root = pc.decode_pickle(pickle_bytes_of(real_states()["shared_storage"]))
    assert pc.describe(root["base"]) == "tensor(float32, shape=[4, 6])"
    assert pc.describe(root["view"]) == "tensor(float32, shape=[2, 4])"
    assert pc.describe(root["bf16"]) == "tensor(bfloat16, shape=[3])"
    assert pc.describe(root["scalar"]) == "tensor(float64, shape=[])"
    assert pc.describe(root["mask"]) == "tensor(bool, shape=[2])"
    assert pc.describe(root["u16"]) == "tensor(uint16, shape=[2])"
    assert pc.describe(root["param"]) == "parameter(float32, shape=[2, 2])"
    assert pc.describe(root["device"]).startswith("object(torch.device)") or "device" in \
        pc.describe(root["device"])
    assert root["same"] is root["base"]
    keys = {pc.tensor_info(root[k]).storage_key for k in ("base", "view", "transposed", "flat")}
    assert len(keys) == 1  # views share the storage record
    tensors = pc.find_tensors(root)
    assert len(tensors) == 11  # "same" is the same object; the parameter counts once


def test_referenced_globals_of_an_optimizer() -> None:
    names = pc.referenced_globals(pc.decode_pickle(pickle_bytes_of(real_states()["adamw"])))
    assert names == {"torch._utils._rebuild_tensor_v2", "torch.FloatStorage",
                     "collections.OrderedDict"}


# --------------------------------------------------------------------------------------------
# Hostile pickles are data, never code
# --------------------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> Any:
        return self.func, self.args


def _exploits(marker: Path) -> list[tuple[bytes, str]]:
    import builtins
    import os

    command = f"touch {marker}"
    return [
        (b"\x80\x02cos\nsystem\nX" + len(command).to_bytes(4, "little") + command.encode()
         + b"\x85R.", "os.system"),
        (pickle.dumps({"x": _Exploit(os.system, command)}, protocol=2), "posix.system"),
        (pickle.dumps(_Exploit(builtins.eval, f"open({str(marker)!r}, 'w')"), protocol=2),
         "__builtin__.eval"),
        (pickle.dumps({"a": _Exploit(builtins.open, str(marker), "w")}, protocol=4),
         "io.open"),
        (pickle.dumps([_Exploit(builtins.exec, f"open({str(marker)!r}, 'w')")], protocol=5),
         "builtins.exec"),
    ]


def test_malicious_pickles_are_decoded_as_data(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for data, global_name in _exploits(marker):
        info = pc.decode_pickle_info(data)
        assert global_name in pc.referenced_globals(info.root)
        reason = pc.weights_only_violation(info.root, info.opcodes)
        assert reason is not None
        assert global_name in reason or "opcode" in reason
        assert pc.weights_only_violation(info.root) is not None
        assert pc.weights_only_violation(info.root, decoded=info) == reason
        assert pc.encode_pickle(info.root) is not None  # re-encodable, still only names
        assert not marker.exists()


def test_torch_agrees_the_exploit_is_refused(tmp_path: Path) -> None:
    import os

    marker = tmp_path / "pwned"
    path = save_to({"state": {}, "x": _Exploit(os.system, f"touch {marker}")}, tmp_path / "e.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    reason = pc.weights_only_violation(pc.decode_pickle(data))
    assert reason is not None and "system" in reason
    assert not marker.exists()


def test_allowlist_matches_installed_torch() -> None:
    from torch import _weights_only_unpickler as wou

    installed = set(wou._get_allowed_globals())
    assert installed <= pc.WEIGHTS_ONLY_ALLOWED_GLOBALS | {
        # names that only exist on builds with extra backends
        name for name in installed if name.startswith(("torch.xpu", "torch.hpu"))}
    assert installed >= pc.WEIGHTS_ONLY_ALLOWED_GLOBALS


# --------------------------------------------------------------------------------------------
# Malformed input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"", b"\x80\x02", b"\x80\x02}q\x00(", b"\x80\x02h\x05.", b"\x80\x02\xff.", b"\x80\x02u.",
    b"\x80\x02X\xff\xff\x00\x00abc.", b"\x80\x02(K\x01K\x02\x86.", b"\x80\x09N.",
    b"\x80\x02]]s.", b"\x80\x02NN.",
])
def test_malformed_pickles_raise_decode_error(data: bytes) -> None:
    with pytest.raises(pc.PickleDecodeError):
        pc.decode_pickle(data)
    assert issubclass(pc.PickleDecodeError, StateFileError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    with contextlib.suppress(pc.PickleDecodeError):
        pc.decode_pickle(b"\x80\x02" + data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_real_pickles_never_crash_the_decoder(data: st.DataObject) -> None:
    original = bytearray(pickle_bytes_of(real_states()["adamw"]))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(original) - 1))
        original[index] = data.draw(st.integers(0, 255))
    try:
        root = pc.decode_pickle(bytes(original))
    except pc.PickleDecodeError:
        return
    pc.weights_only_violation(root)
    pc.find_tensors(root)


# --------------------------------------------------------------------------------------------
# Generated plain data: identical to CPython's pickler
# --------------------------------------------------------------------------------------------

_atoms = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
          | st.text(max_size=8) | st.binary(max_size=8))
_keys = st.integers() | st.text(max_size=6)
_trees = st.recursive(
    _atoms,
    lambda children: (st.lists(children, max_size=6)
                      | st.dictionaries(_keys, children, max_size=6)
                      | st.lists(children, max_size=5).map(tuple)
                      | st.dictionaries(_keys, children, max_size=4).map(OrderedDict)),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(_trees)
def test_encoder_matches_cpython_pickler(tree: Any) -> None:
    expected = pickle.dumps(tree, protocol=2)
    assert pc.encode_pickle(tree) == expected
    decoded = pc.decode_pickle(expected)
    assert decoded == tree
    assert pc.encode_pickle(decoded) == expected


@settings(max_examples=100, deadline=None)
@given(_trees, st.sampled_from([3, 4, 5]))
def test_higher_protocols_decode_to_the_same_values(tree: Any, protocol: int) -> None:
    assert pc.decode_pickle(pickle.dumps(tree, protocol=protocol)) == tree


@settings(max_examples=40, deadline=None)
@given(_trees)
def test_tree_difference_sees_equal_trees_as_equal(tree: Any) -> None:
    data = pickle.dumps(tree, protocol=2)
    assert pc.tree_difference(pc.decode_pickle(data), pc.decode_pickle(data)) is None


def test_tree_difference_notices_values_and_sharing() -> None:
    shared = (0.9, 0.999)
    a = {"g": [{"betas": shared}, {"betas": shared}]}
    b = {"g": [{"betas": tuple([0.9, 0.999])}, {"betas": tuple([0.9, 0.999])}]}
    assert pc.tree_difference(a, b) is not None  # same values, different sharing
    assert pc.tree_difference(a, {"g": [{"betas": shared}, {"betas": shared}]}) is None
    assert "lr" in (pc.tree_difference({"lr": 0.1}, {"lr": 0.2}) or "")
    assert pc.tree_difference({"x": 0.0}, {"x": -0.0}) is not None
    assert pc.tree_difference({"x": 1}, {"x": True}) is not None
