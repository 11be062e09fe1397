"""The example generator writes real, loadable checkpoints in Forgather's layouts."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from forgather_checkpoint import examples
from forgather_checkpoint.examples import (
    LAYOUTS,
    OPTIMIZERS,
    SCHEDULERS,
    SHARING_PATTERNS,
    build_checkpoint,
    make_rank_objects,
)

from .forgather_loader import LoadedComponent, load_manifest_strict

FILE_PATTERNS = {
    "global": r"{key}_state\.pt",
    "replicated": r"{key}_state\.pt",
    "per_rank": r"{key}_state_rank_(?P<rank>\d+)\.pt",
    "per_group": r"{key}_state_group_dp_group_grank_(?P<grank>\d+)_rank_(?P<rank>\d+)\.pt",
    "per_node": r"{key}_state_node_(?P<node>\d+)_rank_(?P<rank>\d+)\.pt",
}
OTHER_FILES = {"checkpoint_manifest.json", "checkpoint_metadata.pt", "eval_metrics.json"}
WEIGHT_FILE = re.compile(r"pytorch_model(-\d{5}-of-\d{5})?\.bin(\.index\.json)?")


def component_files(directory: Path, key: str, pattern: str) -> dict[int, Path]:
    """rank (0 for single-file patterns) -> file, for every file of `key` in `directory`."""
    regex = re.compile(FILE_PATTERNS[pattern].format(key=key))
    found: dict[int, Path] = {}
    for path in directory.iterdir():
        match = regex.fullmatch(path.name)
        if match:
            found[int(match.groupdict().get("rank") or 0)] = path
    return found


def load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def options(layout: str, optimizer: str, scheduler: str, world_size: int) -> dict[str, Any]:
    return dict(layout=layout, optimizer=optimizer, scheduler=scheduler, world_size=world_size)


COMBINATIONS = list(itertools.product(LAYOUTS, OPTIMIZERS, SCHEDULERS))


@pytest.mark.parametrize(("layout", "optimizer", "scheduler"), COMBINATIONS)
def test_every_combination_builds_loadable_files(
    make_checkpoint: Any, layout: str, optimizer: str, scheduler: str
) -> None:
    world_size = 4 if layout in ("per_group", "per_node") else 2
    opts = options(layout, optimizer, scheduler, world_size)
    directory = make_checkpoint(**opts)

    patterns = dict(SHARING_PATTERNS[layout])
    if scheduler == "none":
        del patterns["scheduler"]
    claimed: set[Path] = set()
    for key, pattern in patterns.items():
        files = component_files(directory, key, pattern)
        assert files, f"no {key} files for {pattern}"
        claimed.update(files.values())
    assert not list(directory.glob("scheduler_state*")) or scheduler != "none"
    others = {p.name for p in directory.iterdir() if p not in claimed}
    assert others - OTHER_FILES, "model weights missing"
    assert all(WEIGHT_FILE.fullmatch(name) for name in others - OTHER_FILES), others

    for path in directory.glob("*.pt"):
        load(path)  # every file is weights_only-safe
    for path in directory.glob("*.bin"):
        load(path)

    for rank, path in component_files(directory, "optimizer", patterns["optimizer"]).items():
        saved = load(path)
        fresh = make_rank_objects(**opts, rank=rank)
        fresh.optimizer.load_state_dict(saved)
        assert fresh.optimizer.state_dict()["param_groups"] == saved["param_groups"]
        steps = {int(state["step"]) for state in saved["state"].values() if "step" in state}
        assert steps <= {5}
        assert len(saved["state"]) == sum(len(g["params"]) for g in saved["param_groups"])
    if scheduler != "none":
        (path,) = component_files(directory, "scheduler", patterns["scheduler"]).values()
        saved = load(path)
        fresh = make_rank_objects(**opts)
        assert fresh.scheduler is not None
        fresh.scheduler.load_state_dict(saved)
        assert fresh.scheduler.get_last_lr() == saved["_last_lr"]
        assert saved["last_epoch"] == 5
        fresh.optimizer.step()
        fresh.scheduler.step()  # a resumed schedule keeps going

    manifest = load_manifest_strict(directory)
    assert manifest.world_size == world_size
    assert list(manifest.components) == [k for k in examples.COMPONENT_KEYS if k in patterns]
    for key, entry in manifest.components.items():
        assert entry.sharing_pattern == patterns[key]


def test_manifest_matches_what_forgather_writes(make_checkpoint: Any) -> None:
    directory = make_checkpoint(layout="pipeline", world_size=3)
    raw = json.loads((directory / "checkpoint_manifest.json").read_text())
    assert list(raw) == [
        "checkpoint_path",
        "world_size",
        "timestamp",
        "components",
        "training_args_hash",
        "forgather_version",
        "pytorch_version",
        "metadata",
    ]
    assert raw["checkpoint_path"] == str(directory)
    assert raw["pytorch_version"] == torch.__version__
    assert (directory / "checkpoint_manifest.json").read_text() == json.dumps(raw, indent=2)
    for entry in raw["components"].values():
        assert list(entry) == list(LoadedComponent.__dataclass_fields__)
        assert entry["checksum"] is None
    components = raw["components"]
    size = lambda name: (directory / name).stat().st_size  # noqa: E731
    assert components["optimizer"]["ranks"] == [0, 1, 2]
    # Forgather estimates a per_rank size from rank 0's file alone.
    assert components["optimizer"]["size_bytes"] == 3 * size("optimizer_state_rank_0.pt")
    assert components["scheduler"]["size_bytes"] == size("scheduler_state.pt")
    assert components["scheduler"]["ranks"] == [0]
    assert components["scheduler"]["replicated_across"] == [0, 1, 2]
    assert components["dataset"]["sharing_pattern"] == "global"
    assert components["dataset"]["replicated_across"] is None
    assert "model" not in components


def test_per_group_and_per_node_sizes_sum_the_saved_files(make_checkpoint: Any) -> None:
    for layout, ranks in (("per_group", [0, 1]), ("per_node", [0, 2])):
        directory = make_checkpoint(layout=layout, world_size=4)
        entry = load_manifest_strict(directory).components["optimizer"]
        files = component_files(directory, "optimizer", layout)
        assert sorted(files) == ranks == entry.ranks
        assert entry.size_bytes == sum(path.stat().st_size for path in files.values())
        assert entry.group_name == ("dp_group" if layout == "per_group" else None)


def test_readme_example_layout(example_checkpoint: Path) -> None:
    names = sorted(path.name for path in example_checkpoint.iterdir())
    assert names == [
        "checkpoint_manifest.json",
        "checkpoint_metadata.pt",
        "dataset_state.pt",
        "eval_metrics.json",
        "optimizer_state.pt",
        "pytorch_model.bin",
        "rng_state_rank_0.pt",
        "rng_state_rank_1.pt",
        "scheduler_state.pt",
        "trainer_state.pt",
    ]
    assert example_checkpoint.parent.name == "checkpoints"
    assert example_checkpoint.name == "checkpoint-5"
    optimizer = load(example_checkpoint / "optimizer_state.pt")
    decay, no_decay = optimizer["param_groups"]
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0.0
    assert decay["initial_lr"] == no_decay["initial_lr"] == 1e-3
    assert isinstance(decay["betas"], tuple)
    scheduler = load(example_checkpoint / "scheduler_state.pt")
    assert scheduler["lr_lambdas"] == [{"warmup_steps": 2}, {"warmup_steps": 2}]
    trainer = load(example_checkpoint / "trainer_state.pt")
    assert trainer["global_step"] == 5
    assert set(trainer) == {
        "global_step",
        "epoch_start_step",
        "raw_epoch",
        "num_input_tokens_seen",
        "total_flos",
    }
    rng = [load(example_checkpoint / f"rng_state_rank_{rank}.pt") for rank in (0, 1)]
    assert rng[0]["torch_rng_state"].dtype == torch.uint8
    assert [state["initial_seed"] for state in rng] == [0, 1]
    assert not torch.equal(rng[0]["torch_rng_state"], rng[1]["torch_rng_state"])
    dataset = load(example_checkpoint / "dataset_state.pt")
    assert dataset["_sampler_iter_state"]["sampler_iter_state"]["yielded"] == 40
    model = load(example_checkpoint / "pytorch_model.bin")
    assert set(model) == {"layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"}


def test_pipeline_ranks_hold_different_parameters_and_hyperparameters(
    make_checkpoint: Any,
) -> None:
    directory = make_checkpoint(layout="pipeline", world_size=2)
    first, last = (load(directory / f"optimizer_state_rank_{rank}.pt") for rank in (0, 1))
    shapes = [
        [tuple(state["exp_avg"].shape) for state in saved["state"].values()]
        for saved in (first, last)
    ]
    assert shapes == [[(16, 8), (16,)], [(4, 16), (4,)]]
    assert first["param_groups"][0]["weight_decay"] != last["param_groups"][0]["weight_decay"]
    index = json.loads((directory / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"].values()) == {
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    }


def test_training_really_happened_and_is_deterministic(make_checkpoint: Any) -> None:
    one = make_checkpoint(optimizer="sgd", scheduler="cosine", seed=3)
    two = make_checkpoint(optimizer="sgd", scheduler="cosine", seed=3)
    first, second = (load(d / "optimizer_state.pt") for d in (one, two))
    for a, b in zip(first["state"].values(), second["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
        assert a["momentum_buffer"].abs().sum() > 0
    lr = first["param_groups"][0]["lr"]
    assert lr < first["param_groups"][0]["initial_lr"]  # cosine has decayed it


def test_ddp_replicas_agree_and_ranks_keep_their_own_data_state(make_checkpoint: Any) -> None:
    directory = make_checkpoint(layout="ddp", world_size=2)
    datasets = [load(directory / f"dataset_state_rank_{rank}.pt") for rank in (0, 1)]
    assert [d["dataset_state"]["shard"]["index"] for d in datasets] == [0, 1]
    assert not (directory / "optimizer_state_rank_0.pt").exists()


def test_no_manifest_and_caller_rng_untouched(make_checkpoint: Any) -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    directory = make_checkpoint(manifest=False, world_size=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert not (directory / "checkpoint_manifest.json").exists()
    assert sorted(p.name for p in directory.glob("rng_state*")) == ["rng_state_rank_0.pt"]


def test_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_checkpoint(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("argument", "value"),
    [("layout", "zero"), ("optimizer", "lion"), ("scheduler", "wsd")],
)
def test_rejects_unknown_choices(tmp_path: Path, argument: str, value: str) -> None:
    with pytest.raises(ValueError, match=value):
        build_checkpoint(tmp_path / "x", **{argument: value})
    assert not (tmp_path / "x").exists()


def test_module_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "checkpoint-5"
    assert examples.main([str(target), "--layout", "ddp", "--scheduler", "sequential"]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert load_manifest_strict(target).components["optimizer"].sharing_pattern == "replicated"

    assert examples.main([str(target)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "refusing to overwrite" in captured.err

    with pytest.raises(SystemExit) as exit_info:
        examples.main([str(tmp_path / "other"), "--layout", "fsdp"])
    assert exit_info.value.code == 2
