"""A child process that commits one transaction, for the crash and concurrency tests.

Run as ``python writer_child.py SPEC_JSON``. SPEC: ``checkpoint`` (dir), ``sources`` (mapping of
target file name -> file holding its new bytes), optional ``wait``, ``backup``, ``go_file`` (spin
until it exists, so several children start together), ``chunk`` (render chunk size).
The render copies the new bytes in chunks with a flush each, so a kill at a random instant can
land in the middle of a multi-megabyte write. Prints one JSON line; exit 0 on success, 1 on a
tool error (the message is printed, like the CLI's ``Error: ...``).
"""

from __future__ import annotations

import filecmp
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from forgather_checkpoint import errors
from forgather_checkpoint.writer import StagedWrite, commit_atomically


def _write(target: Path, source: Path, chunk: int) -> StagedWrite:
    def render(temp: Path, _rendered: Mapping[Path, Path]) -> None:
        with open(source, "rb") as src, open(temp, "wb") as dst:
            while block := src.read(chunk):
                dst.write(block)
                dst.flush()

    def validate(temp: Path) -> None:
        if not filecmp.cmp(source, temp, shallow=False):
            raise errors.ValidationError(f"{temp} differs from {source}")

    return StagedWrite(target, render, validate)


def main() -> int:
    spec = json.loads(sys.argv[1])
    ckpt = Path(spec["checkpoint"])
    go = spec.get("go_file")
    while go and not Path(go).exists():
        time.sleep(0.005)
    writes = [
        _write(ckpt / name, Path(source), int(spec.get("chunk", 1 << 18)))
        for name, source in spec["sources"].items()
    ]
    try:
        result = commit_atomically(
            ckpt,
            writes,
            backup=bool(spec.get("backup", True)),
            wait=float(spec.get("wait", 0.0)),
            record={"component": "test", "text": spec.get("label", "")},
        )
    except errors.CheckpointToolError as exc:
        print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
        return 1
    print(json.dumps({"ok": True, "id": result.commit_id, "label": spec.get("label", "")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
