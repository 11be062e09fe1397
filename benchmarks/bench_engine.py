"""Benchmark of the format engine against the physical limit and the torch round trip.

Not part of the tests. Generates an AdamW-like optimizer state split over rank files with
torch.save under a scratch directory (default /tmp), then measures side by side, as medians
of several runs:

  (a) decode time: read_state_file of every rank file (what ``list``/``--dry-run`` decode),
      in-process and as a fresh interpreter (import included);
  (b) rewrite time (read + encode + rewrite + verify + fsync, rank files in parallel threads)
      against ``cp`` of the same files plus ``sync``;
  (c) the same rewrite against torch.load -> edit -> torch.save -> torch.load (validation);
  (d) peak RSS of a rewrite in a child process, via RUSAGE_CHILDREN of a middle process.

Usage: python benchmarks/bench_engine.py [--total-gb 1.0] [--ranks 4] [--runs 5] [--dir /tmp]
Targets (issue 4): (a) < 0.3 s, (b) <= 1.2, (c) <= 0.33, (d) < 150 MB at 4 GB of state.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_NUMEL = 1 << 20  # elements per moment tensor (4 MiB of float32)


def generate(directory: Path, total_bytes: int, ranks: int) -> list[Path]:
    import torch

    per_rank = total_bytes // ranks
    params = max(1, per_rank // (2 * 4 * _NUMEL))  # exp_avg + exp_avg_sq, float32
    paths = []
    for rank in range(ranks):
        generator = torch.Generator().manual_seed(rank)
        state = {
            index: {
                "step": torch.tensor(100.0),
                "exp_avg": torch.randn(_NUMEL, generator=generator),
                "exp_avg_sq": torch.rand(_NUMEL, generator=generator),
            }
            for index in range(params)
        }
        half = params // 2
        groups = [
            {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1,
             "amsgrad": False, "foreach": None, "maximize": False, "capturable": False,
             "differentiable": False, "fused": None, "initial_lr": 3e-4,
             "params": list(range(half))},
            {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0,
             "amsgrad": False, "foreach": None, "maximize": False, "capturable": False,
             "differentiable": False, "fused": None, "initial_lr": 3e-4,
             "params": list(range(half, params))},
        ]
        path = directory / f"optimizer_state_rank_{rank}.pt"
        torch.save({"state": state, "param_groups": groups}, path)
        paths.append(path)
    return paths


def _drop(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def engine_rewrite(paths: list[Path], lr: float) -> list[Path]:
    """What ``modify`` does per file: read, edit copy-on-write, write, verify, fsync."""
    from forgather_checkpoint import stateformat

    def one(path: Path) -> Path:
        doc = stateformat.read_state_file(path)
        groups = [dict(group, lr=lr) for group in doc.root["param_groups"]]
        new_root = dict(doc.root, param_groups=groups)
        target = path.with_name(path.name + ".engine.tmp")
        stateformat.write_state_file(doc, new_root, target)
        stateformat.verify_state_file(doc, target, new_root)
        _fsync(target)
        return target

    with ThreadPoolExecutor(max_workers=len(paths)) as pool:
        return list(pool.map(one, paths))


def torch_rewrite(paths: list[Path], lr: float) -> list[Path]:
    """The load-edit-save-reload approach the engine replaces."""
    import torch

    targets = []
    for path in paths:
        state = torch.load(path, weights_only=True, map_location="cpu")
        for group in state["param_groups"]:
            group["lr"] = lr
        target = path.with_name(path.name + ".torch.tmp")
        torch.save(state, target)
        del state
        torch.load(target, weights_only=True, map_location="cpu")  # validation
        _fsync(target)
        targets.append(target)
    return targets


def copy_and_sync(paths: list[Path]) -> list[Path]:
    destination = paths[0].parent / "cpdir"
    subprocess.run(["cp", *map(str, paths), str(destination)], check=True)
    subprocess.run(["sync"], check=True)
    return [destination / path.name for path in paths]


def decode_all(paths: list[Path]) -> None:
    from forgather_checkpoint import stateformat

    for path in paths:
        stateformat.read_state_file(path)


def _median_time(action: Callable[[], object], runs: int,
                 cleanup: Callable[[object], None] = lambda _: None) -> float:
    times = []
    for _ in range(runs):
        # Start every run with no dirty pages, so nobody pays for an earlier run's writeback.
        subprocess.run(["sync"], check=True)
        start = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - start)
        cleanup(result)
    return statistics.median(times)


_CHILD = """
import resource, subprocess, sys
subprocess.run([sys.executable, "-c", sys.argv[1]], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mb(worker_code: str) -> float:
    """Peak RSS of ``worker_code`` run as the only child of a tiny middle process."""
    output = subprocess.run([sys.executable, "-c", _CHILD, worker_code], check=True,
                            capture_output=True, text=True).stdout
    return int(output.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-gb", type=float, default=1.0)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    options = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fc-bench-", dir=options.dir))
    try:
        print(f"generating {options.total_gb:g} GB over {options.ranks} rank files in {work}",
              file=sys.stderr)
        paths = generate(work, int(options.total_gb * 1e9), options.ranks)
        total = sum(path.stat().st_size for path in paths)
        (work / "cpdir").mkdir()
        decode_all(paths)  # warm the page cache and imports alike for every contender

        decode = _median_time(lambda: decode_all(paths), options.runs)
        fresh_code = ("from pathlib import Path; from forgather_checkpoint import stateformat;"
                      f"[stateformat.read_state_file(Path(p)) for p in {list(map(str, paths))}]")
        fresh = _median_time(lambda: subprocess.run([sys.executable, "-c", fresh_code],
                                                    check=True), options.runs)
        engine = _median_time(lambda: engine_rewrite(paths, 1e-4), options.runs, _drop)
        copy = _median_time(lambda: copy_and_sync(paths), options.runs, _drop)
        torch_time = _median_time(lambda: torch_rewrite(paths, 1e-4), options.runs, _drop)
        rss_code = ("from pathlib import Path; import sys; sys.path.insert(0, "
                    f"{str(Path(__file__).parent)!r}); import bench_engine as b;"
                    f"b.engine_rewrite([Path(p) for p in {list(map(str, paths))}], 1e-4)")
        engine_rss = peak_rss_mb(rss_code)
        _drop([path.with_name(path.name + ".engine.tmp") for path in paths])
        torch_rss = peak_rss_mb(rss_code.replace("engine_rewrite", "torch_rewrite"))
        _drop([path.with_name(path.name + ".torch.tmp") for path in paths])

        rows = [
            ("state size", f"{total / 1e9:.2f} GB in {len(paths)} files", ""),
            ("(a) decode all files, in process", f"{decode * 1000:.1f} ms", "target < 300 ms"),
            ("(a) decode all files, fresh python", f"{fresh * 1000:.1f} ms",
             "incl. interpreter start"),
            ("(b) engine rewrite (read+write+verify+fsync)", f"{engine:.3f} s", ""),
            ("    cp + sync of the same files", f"{copy:.3f} s", ""),
            ("    ratio engine / (cp + sync)", f"{engine / copy:.2f}", "target <= 1.2"),
            ("(c) torch load/edit/save/reload", f"{torch_time:.3f} s", ""),
            ("    ratio engine / torch", f"{engine / torch_time:.3f}", "target <= 0.33"),
            ("(d) peak RSS, engine rewrite", f"{engine_rss:.0f} MB", "target < 150 MB"),
            ("    peak RSS, torch approach", f"{torch_rss:.0f} MB", ""),
        ]
        width = max(len(row[0]) for row in rows)
        print(f"{'measure':<{width}}  {'value':>24}  note")
        for name, value, note in rows:
            print(f"{name:<{width}}  {value:>24}  {note}")
    finally:
        if not options.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
