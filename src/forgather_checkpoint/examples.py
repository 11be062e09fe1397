"""Real example checkpoints in Forgather's on-disk layouts.

`build_checkpoint` trains a tiny MLP for a few steps with a real ``torch.optim`` optimizer and a
real ``torch.optim.lr_scheduler`` scheduler and saves the result the way Forgather's checkpoint
coordinator does: one ``{key}_state*.pt`` file set per component (named by its sharing pattern),
model weights in Hugging Face shard layout, ``checkpoint_metadata.pt``, ``eval_metrics.json`` and
``checkpoint_manifest.json``. Multi-rank layouts are simulated in one process with one model,
optimizer and scheduler per rank, so rank files hold what real ranks would hold.

This module imports torch; nothing else in the package imports it eagerly. Run it as
``python -m forgather_checkpoint.examples DIR [--layout ...]`` to create an example on disk.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

LAYOUTS: tuple[str, ...] = ("single", "ddp", "pipeline", "per_group", "per_node")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "adam", "adagrad")
SCHEDULERS: tuple[str, ...] = ("lambda", "cosine", "sequential", "onecycle", "constant", "none")

COMPONENT_KEYS: tuple[str, ...] = ("optimizer", "scheduler", "trainer", "dataset", "rng")
"""Component keys in the order Forgather's trainers declare (and save) them."""

SHARING_PATTERNS: dict[str, dict[str, str]] = {
    "single": {
        "optimizer": "global",
        "scheduler": "global",
        "trainer": "global",
        "dataset": "global",
        "rng": "per_rank",
    },
    "ddp": {
        "optimizer": "replicated",
        "scheduler": "replicated",
        "trainer": "replicated",
        "dataset": "per_rank",
        "rng": "per_rank",
    },
    "pipeline": {
        "optimizer": "per_rank",
        "scheduler": "replicated",
        "trainer": "replicated",
        "dataset": "global",
        "rng": "per_rank",
    },
    "per_group": {
        "optimizer": "per_group",
        "scheduler": "replicated",
        "trainer": "replicated",
        "dataset": "global",
        "rng": "per_rank",
    },
    "per_node": {
        "optimizer": "per_node",
        "scheduler": "replicated",
        "trainer": "replicated",
        "dataset": "per_rank",
        "rng": "per_rank",
    },
}
"""The sharing pattern of each component, per layout (the scheduler is absent with 'none')."""

GROUP_NAME = "dp_group"
"""The process group of the ``per_group`` layout: ranks holding the same pipeline stage."""

RANKS_PER_NODE = 2
"""Local world size of the ``per_node`` layout (a last, smaller node takes the remainder)."""

MANIFEST_NAME = "checkpoint_manifest.json"

_IN_FEATURES = 8
_HIDDEN_FEATURES = 16
_OUT_FEATURES = 4
_BATCH_SIZE = 8
_SEQUENCE_LENGTH = 32

_BASE_LR = {"adamw": 1e-3, "sgd": 0.1, "adam": 1e-3, "adagrad": 1e-2}
_DECAY = 0.1
_LAST_STAGE_DECAY = 0.05


class TinyMLP(nn.Module):
    """A stack of linear layers with ReLU between them; small enough to train in milliseconds."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(width_in, width_out) for width_in, width_out in zip(widths, widths[1:])
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = inputs
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden)
            if index < len(self.layers) - 1:
                hidden = torch.relu(hidden)
        return hidden


class LinearWarmup:
    """LambdaLR multiplier: linear warmup to 1.0, then constant.

    A callable object rather than a function so that ``LambdaLR.state_dict()`` saves its
    ``__dict__`` (``lr_lambdas`` becomes ``[{"warmup_steps": N}, ...]``), as Forgather's own
    schedulers do.
    """

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / (self.warmup_steps + 1))


@dataclass(frozen=True)
class RankObjects:
    """The training objects of one simulated rank (or stage, group or node)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: lr_scheduler.LRScheduler | None


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _num_layers(layout: str, world_size: int) -> int:
    # Pipeline-style layouts give every stage at least one linear layer.
    if layout in ("pipeline", "per_group"):
        return max(2, _num_stages(layout, world_size))
    return 2


def _num_stages(layout: str, world_size: int) -> int:
    if layout == "pipeline":
        return world_size
    if layout == "per_group":
        # Hybrid data x pipeline parallel: two stages when there are ranks for it.
        return 2 if world_size >= 2 else 1
    return 1


def _widths(num_layers: int) -> list[int]:
    return [_IN_FEATURES] + [_HIDDEN_FEATURES] * (num_layers - 1) + [_OUT_FEATURES]


def _stage_layers(num_layers: int, num_stages: int, stage: int) -> range:
    """Contiguous slice of layer indices owned by `stage` (earlier stages take the remainder)."""
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def _param_groups(
    optimizer: str, named: Sequence[tuple[str, nn.Parameter]], *, last_stage_of_many: bool
) -> list[dict[str, Any]]:
    if optimizer != "adamw":
        return [{"params": [param for _, param in named]}]
    # The usual transformer recipe: no weight decay on biases. The last pipeline stage (the
    # "head") uses a different decay, so rank files disagree on a hyperparameter.
    decay = _LAST_STAGE_DECAY if last_stage_of_many else _DECAY
    return [
        {"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": decay},
        {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
    ]


def make_optimizer(name: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """A fresh optimizer of kind `name` (one of `OPTIMIZERS`) over `groups`."""
    _check_choice("optimizer", name, OPTIMIZERS)
    lr = _BASE_LR[name]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.Adagrad(groups, lr=lr, lr_decay=1e-4)


def make_scheduler(
    name: str, optimizer: torch.optim.Optimizer, *, steps: int
) -> lr_scheduler.LRScheduler | None:
    """A fresh scheduler of kind `name` (one of `SCHEDULERS`) whose horizon outlasts `steps`.

    The schedule runs for four times the training steps, so a checkpoint taken after `steps`
    is mid-schedule: learning rates keep changing after a resume.
    """
    _check_choice("scheduler", name, SCHEDULERS)
    horizon = 4 * steps
    warmup = max(1, steps // 2)
    if name == "none":
        return None
    if name == "lambda":
        return lr_scheduler.LambdaLR(optimizer, LinearWarmup(warmup))
    if name == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=horizon, eta_min=1e-6)
    if name == "sequential":
        return lr_scheduler.SequentialLR(
            optimizer,
            schedulers=[
                lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup),
                lr_scheduler.CosineAnnealingLR(optimizer, T_max=horizon - warmup, eta_min=1e-6),
            ],
            milestones=[warmup],
        )
    if name == "onecycle":
        has_momentum = any("betas" in g or g.get("momentum", 0) for g in optimizer.param_groups)
        return lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=horizon + 1,
            cycle_momentum=has_momentum,
        )
    return lr_scheduler.ConstantLR(optimizer, factor=0.5, total_iters=horizon)


def make_rank_objects(
    *,
    layout: str = "single",
    optimizer: str = "adamw",
    scheduler: str = "lambda",
    world_size: int = 2,
    steps: int = 5,
    seed: int = 0,
    rank: int = 0,
) -> RankObjects:
    """Fresh (untrained) model part, optimizer and scheduler shaped like `rank`'s saved state.

    For ``pipeline`` the rank is the pipeline stage; for ``per_group`` the stage whose group
    leader saved the file (``rank`` = the ``rank_{r}`` in its name); for ``per_node`` any node.
    Use it to check a saved file with ``load_state_dict`` into real torch objects.
    """
    _check_choice("layout", layout, LAYOUTS)
    num_layers = _num_layers(layout, world_size)
    num_stages = _num_stages(layout, world_size)
    stage = rank % num_stages if layout == "per_group" else (rank if num_stages > 1 else 0)
    if stage >= num_stages:
        raise ValueError(f"rank {rank} out of range for layout {layout!r} ({num_stages} stages)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyMLP(_widths(num_layers))
    owned = set(_stage_layers(num_layers, num_stages, stage))
    named = [
        (name, param)
        for name, param in model.named_parameters()
        if int(name.split(".")[1]) in owned
    ]
    groups = _param_groups(
        optimizer, named, last_stage_of_many=num_stages > 1 and stage == num_stages - 1
    )
    opt = make_optimizer(optimizer, groups)
    return RankObjects(model, opt, make_scheduler(scheduler, opt, steps=steps))


def _batches(seed: int, steps: int, rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs = torch.randn(rows, _IN_FEATURES, generator=generator)
        yield inputs, torch.randn(rows, _OUT_FEATURES, generator=generator)


def _train(
    parts: Sequence[RankObjects], model: nn.Module, *, steps: int, data_seed: int, shards: int
) -> float:
    """Train `model` for `steps` steps; every part's optimizer steps its own parameters.

    With ``shards > 1`` each step's batch is split across data-parallel replicas that all hold
    `model`'s parameters: the mean of the shard gradients is what DDP's all-reduce produces.
    """
    loss = torch.tensor(0.0)
    for inputs, targets in _batches(data_seed, steps, _BATCH_SIZE * shards):
        for part in parts:
            part.optimizer.zero_grad()
        losses = [
            nn.functional.mse_loss(model(x), y) / shards
            for x, y in zip(inputs.chunk(shards), targets.chunk(shards))
        ]
        loss = torch.stack(losses).sum()
        loss.backward()
        for part in parts:
            part.optimizer.step()
            if part.scheduler is not None:
                part.scheduler.step()
    return float(loss.detach())


def _trainer_state(steps: int, tokens_per_step: int) -> dict[str, Any]:
    return {
        "global_step": steps,
        "epoch_start_step": 0,
        "raw_epoch": 0,
        "num_input_tokens_seen": steps * tokens_per_step,
        "total_flos": float(6 * steps * tokens_per_step * _HIDDEN_FEATURES),
    }


def _dataset_state(steps: int, rank: int, world_size: int, seed: int) -> dict[str, Any]:
    """Shaped like a torchdata ``StatefulDataLoader.state_dict()``: deeply nested."""
    sampler_generator = torch.Generator().manual_seed(seed + rank)
    torch.randperm(64, generator=sampler_generator)
    yielded = steps * _BATCH_SIZE
    return {
        "_index_sampler_state": None,
        "_sampler_iter_state": {
            "samples_yielded": yielded,
            "sampler_iter_state": {
                "generator": sampler_generator.get_state(),
                "yielded": yielded,
            },
        },
        "_sampler_iter_yielded": steps,
        "_num_yielded": steps,
        "_IterableDataset_len_called": None,
        "_shared_seed": None,
        "fetcher_state": {"dataset_iter_state": None, "fetcher_ended": False},
        "dataset_state": {
            "shard": {"index": rank, "num_shards": world_size},
            "position": yielded,
            "epoch": 0,
        },
        "_iterator_finished": False,
    }


def _rng_state(seed: int, rank: int, steps: int) -> dict[str, Any]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + rank)
        torch.rand(steps, 4)  # the draws (dropout, sampling) a real run would have made
        return {"torch_rng_state": torch.get_rng_state(), "initial_seed": torch.initial_seed()}


def _component_file(
    key: str, pattern: str, rank: int, *, group_rank: int = 0, node: int = 0
) -> str:
    if pattern in ("global", "replicated"):
        return f"{key}_state.pt"
    if pattern == "per_rank":
        return f"{key}_state_rank_{rank}.pt"
    if pattern == "per_group":
        return f"{key}_state_group_{GROUP_NAME}_grank_{group_rank}_rank_{rank}.pt"
    if pattern == "per_node":
        return f"{key}_state_node_{node}_rank_{rank}.pt"
    raise ValueError(f"unknown sharing pattern {pattern!r}")


def _manifest_entry(key: str, pattern: str, saved: dict[int, Path], world_size: int) -> dict:
    """A component entry with the fields and sizes Forgather's coordinator writes."""
    ranks = sorted(saved)
    sizes = [saved[rank].stat().st_size for rank in ranks]
    replicated_across: list[int] | None = None
    if pattern == "per_rank":
        # Forgather only knows rank 0's file size and multiplies it.
        size = sizes[0] * world_size
    elif pattern == "replicated":
        size = sizes[0]
        replicated_across = list(range(world_size))
    else:
        size = sum(sizes)
    return {
        "key": key,
        "sharing_pattern": pattern,
        "ranks": ranks,
        "replicated_across": replicated_across,
        "group_name": GROUP_NAME if pattern == "per_group" else None,
        "size_bytes": size,
        "checksum": None,
        "metadata": {},
    }


def _save_weights(directory: Path, stage_states: list[dict[str, torch.Tensor]]) -> None:
    if len(stage_states) == 1:
        torch.save(stage_states[0], directory / "pytorch_model.bin")
        return
    weight_map: dict[str, str] = {}
    total_size = 0
    count = len(stage_states)
    for index, state in enumerate(stage_states, start=1):
        shard = f"pytorch_model-{index:05d}-of-{count:05d}.bin"
        torch.save(state, directory / shard)
        for name, tensor in state.items():
            weight_map[name] = shard
            total_size += tensor.numel() * tensor.element_size()
    index_doc = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index_doc, indent=2))


def _stage_state(model: nn.Module, owned: range) -> dict[str, torch.Tensor]:
    return {
        name: tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if int(name.split(".")[1]) in owned
    }


def _node_of(rank: int) -> int:
    return rank // RANKS_PER_NODE


def build_checkpoint(
    directory: Path,
    *,
    layout: str = "single",
    optimizer: str = "adamw",
    scheduler: str = "lambda",
    world_size: int = 2,
    steps: int = 5,
    manifest: bool = True,
    seed: int = 0,
    timestamp: datetime | None = None,
) -> Path:
    """Train a tiny model for `steps` steps and save a Forgather checkpoint into `directory`.

    `directory` is the checkpoint directory itself (Forgather names it
    ``OUTPUT_DIR/checkpoints/checkpoint-STEP``); it is created and must not already hold files
    (`FileExistsError`). `layout` is one of `LAYOUTS` (sharing patterns in `SHARING_PATTERNS`),
    `optimizer` one of `OPTIMIZERS`, `scheduler` one of `SCHEDULERS`; `world_size` is the
    number of simulated ranks. The global RNG state of the caller is left untouched.
    Returns `directory`.
    """
    _check_choice("layout", layout, LAYOUTS)
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("scheduler", scheduler, SCHEDULERS)
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} exists and is not an empty directory")
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        _build(
            directory, layout, optimizer, scheduler, world_size, steps, manifest, seed, timestamp
        )
    return directory


def _build(
    directory: Path,
    layout: str,
    optimizer: str,
    scheduler: str,
    world_size: int,
    steps: int,
    manifest: bool,
    seed: int,
    timestamp: datetime | None,
) -> None:
    patterns = dict(SHARING_PATTERNS[layout])
    if scheduler == "none":
        del patterns["scheduler"]
    num_layers = _num_layers(layout, world_size)
    num_stages = _num_stages(layout, world_size)

    def objects(rank: int) -> RankObjects:
        return make_rank_objects(
            layout=layout,
            optimizer=optimizer,
            scheduler=scheduler,
            world_size=world_size,
            steps=steps,
            seed=seed,
            rank=rank,
        )

    # rank -> (the objects whose optimizer state that rank saves, the file it saves to)
    optimizer_files: dict[int, tuple[RankObjects, str]] = {}
    scheduler_source: RankObjects
    weights: list[dict[str, torch.Tensor]]
    eval_loss: float
    if layout in ("single", "ddp"):
        # DDP replicas start from the same seed and apply the same all-reduced gradient, so
        # one replica trained on the whole (sharded) batch stands for every rank.
        shards = world_size if layout == "ddp" else 1
        replica = objects(0)
        eval_loss = _train([replica], replica.model, steps=steps, data_seed=seed, shards=shards)
        optimizer_files[0] = (replica, _component_file("optimizer", patterns["optimizer"], 0))
        scheduler_source = replica
        weights = [_stage_state(replica.model, range(num_layers))]
    elif layout in ("pipeline", "per_group"):
        # One model; each stage's optimizer updates only that stage's layers, which is what a
        # pipeline schedule computes. per_group adds data-parallel replicas of every stage.
        stages = [objects(stage) for stage in range(num_stages)]
        model = stages[0].model
        stage_params = [_rebind(stage, model) for stage in stages]
        replicas = max(1, world_size // num_stages)
        eval_loss = _train(stage_params, model, steps=steps, data_seed=seed, shards=replicas)
        for stage, objs in enumerate(stage_params):
            name = _component_file("optimizer", patterns["optimizer"], stage)
            optimizer_files[stage] = (objs, name)
        scheduler_source = stage_params[0]
        weights = [
            _stage_state(model, _stage_layers(num_layers, num_stages, stage))
            for stage in range(num_stages)
        ]
    else:  # per_node: nodes train independently (local SGD); node leaders save.
        leaders = sorted({_node_of(rank) * RANKS_PER_NODE for rank in range(world_size)})
        eval_loss = 0.0
        for node, leader in enumerate(leaders):
            node_objects = objects(leader)
            local = min(RANKS_PER_NODE, world_size - leader)
            eval_loss = _train(
                [node_objects],
                node_objects.model,
                steps=steps,
                data_seed=seed + 1000 * node,
                shards=local,
            )
            name = _component_file("optimizer", "per_node", leader, node=node)
            optimizer_files[leader] = (node_objects, name)
        scheduler_source = optimizer_files[leaders[0]][0]
        weights = [_stage_state(scheduler_source.model, range(num_layers))]

    saved: dict[str, dict[int, Path]] = {}

    def save(key: str, rank: int, file_name: str, state: Any) -> None:
        path = directory / file_name
        torch.save(state, path)
        saved.setdefault(key, {})[rank] = path

    for rank, (objs, file_name) in optimizer_files.items():
        save("optimizer", rank, file_name, objs.optimizer.state_dict())
    if scheduler_source.scheduler is not None:
        file_name = _component_file("scheduler", patterns["scheduler"], 0)
        save("scheduler", 0, file_name, scheduler_source.scheduler.state_dict())
    tokens_per_step = _BATCH_SIZE * _SEQUENCE_LENGTH * world_size
    save("trainer", 0, "trainer_state.pt", _trainer_state(steps, tokens_per_step))
    dataset_ranks = range(world_size) if patterns["dataset"] == "per_rank" else range(1)
    for rank in dataset_ranks:
        file_name = _component_file("dataset", patterns["dataset"], rank)
        save("dataset", rank, file_name, _dataset_state(steps, rank, world_size, seed))
    for rank in range(world_size):
        save("rng", rank, f"rng_state_rank_{rank}.pt", _rng_state(seed, rank, steps))

    _save_weights(directory, weights)
    torch.save(
        {
            "callback_states": {"ProgressCallback": {"last_logged_step": steps}},
            "best_checkpoints": [],
        },
        directory / "checkpoint_metadata.pt",
    )
    metrics = {"eval_loss": eval_loss, "global_step": steps, "epoch": 0.0}
    (directory / "eval_metrics.json").write_text(json.dumps(metrics, indent=2))

    if manifest:
        document = {
            "checkpoint_path": str(directory),
            "world_size": world_size,
            "timestamp": (timestamp or datetime.now()).isoformat(),
            "components": {
                key: _manifest_entry(key, patterns[key], saved[key], world_size)
                for key in COMPONENT_KEYS
                if key in saved
            },
            "training_args_hash": None,
            "forgather_version": None,
            "pytorch_version": torch.__version__,
            "metadata": {},
        }
        with open(directory / MANIFEST_NAME, "w") as stream:
            json.dump(document, stream, indent=2)


def _rebind(stage: RankObjects, model: nn.Module) -> RankObjects:
    """`stage`'s optimizer and scheduler, re-pointed at the same-named parameters of `model`."""
    by_name = dict(model.named_parameters())
    own_names = {id(param): name for name, param in stage.model.named_parameters()}
    for group in stage.optimizer.param_groups:
        group["params"] = [by_name[own_names[id(param)]] for param in group["params"]]
    # Some optimizers (Adagrad) create their per-parameter state eagerly, keyed by parameter.
    for old in list(stage.optimizer.state):
        stage.optimizer.state[by_name[own_names[id(old)]]] = stage.optimizer.state.pop(old)
    return RankObjects(model, stage.optimizer, stage.scheduler)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m forgather_checkpoint.examples DIR``: create an example checkpoint in DIR."""
    parser = argparse.ArgumentParser(
        prog="python -m forgather_checkpoint.examples",
        description="Train a tiny model for a few steps and save a Forgather-layout checkpoint "
        "into DIR (which must not exist or be empty).",
    )
    parser.add_argument("directory", metavar="DIR", type=Path)
    parser.add_argument("--layout", choices=LAYOUTS, default="single")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="lambda")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-manifest", action="store_true", help="omit checkpoint_manifest.json")
    args = parser.parse_args(argv)
    if args.world_size < 1 or args.steps < 1:
        parser.error("--world-size and --steps must be at least 1")
    try:
        path = build_checkpoint(
            args.directory,
            layout=args.layout,
            optimizer=args.optimizer,
            scheduler=args.scheduler,
            world_size=args.world_size,
            steps=args.steps,
            manifest=not args.no_manifest,
            seed=args.seed,
        )
    except FileExistsError as error:
        print(f"Error: {error}; refusing to overwrite it (choose a new DIR)", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
