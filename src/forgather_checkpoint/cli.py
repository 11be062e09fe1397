"""The ``forgather checkpoint`` command group.

Parses options, calls the services in ``operations``, renders what comes back. stdout carries
data (tables, ``--json``); stderr carries chatter (progress, warnings, prompts). Domain errors
become ``Error: ...`` with exit status 1 in exactly one place, ``_CheckpointGroup.invoke``.

This module must import without importing torch: the ``forgather`` host imports every plugin to
render ``forgather --help``. Services are imported inside the commands.
"""

from __future__ import annotations

import glob
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .errors import (
    CheckpointToolError,
    EditSpecError,
    StaleReadError,
    UsageProblem,
    ValidationError,
)

JSON_SCHEMA_VERSION = 1


class _CheckpointGroup(click.Group):
    """Maps the tool's typed errors to click's exits (1 for errors, 2 for usage).

    Forgather core has ``checkpoint`` subcommands of its own (``forgather checkpoint link``);
    this group takes the ``checkpoint`` name, so a subcommand it does not know is handed to
    core unchanged when core is installed.
    """

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            from .host import forgather_installed, run_core

            if forgather_installed():
                run_core(ctx, ["checkpoint", *args])
            known = ", ".join(self.list_commands(ctx))
            raise click.UsageError(
                f"No such command '{name}' (commands: {known}). If it is Forgather core's own "
                f"'forgather checkpoint {name}', install Forgather to use it.", ctx)
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageProblem as exc:
            raise click.UsageError(str(exc)) from exc
        except ValidationError as exc:
            raise click.ClickException(
                f"modified checkpoint failed validation: {exc}; nothing was replaced, every "
                "original file is unchanged") from exc
        except CheckpointToolError as exc:
            raise click.ClickException(str(exc)) from exc


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=_CheckpointGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="forgather-checkpoint", prog_name="forgather-checkpoint")
def checkpoint() -> None:
    """Inspect and change hyperparameters in saved checkpoints.

    Change the learning rate, weight decay, betas, scheduler position or any other non-tensor
    value of a saved Forgather checkpoint, so a long run resumes with the change instead of
    restarting. Every file of a component (all rank files) is edited as one unit, originals
    are backed up, and nothing is replaced unless every new file validates.

    \b
    Examples:
      forgather checkpoint components checkpoints/checkpoint-10000
      forgather checkpoint list checkpoints/checkpoint-10000 --component optimizer
      forgather checkpoint modify checkpoints/checkpoint-10000 --component optimizer \\
          --set weight_decay=0.01 --dry-run
      forgather checkpoint lr checkpoints/checkpoint-10000 --scale 0.5
      forgather checkpoint verify 'checkpoints/checkpoint-*'

    Exit status: 0 success, 1 error (nothing changed), 2 usage error.
    """


CHECKPOINT_ARG = click.argument(
    "checkpoint_path", metavar="CHECKPOINT",
    type=click.Path(path_type=Path, exists=False, file_okay=True, dir_okay=True),
)
CHECKPOINTS_ARG = click.argument(
    "checkpoint_paths", metavar="CHECKPOINT...", nargs=-1, required=True,
    type=click.Path(path_type=Path, exists=False, file_okay=True, dir_okay=True),
)
OPTIMIZER_OPT = click.option(
    "--optimizer", "optimizer_index", type=click.IntRange(min=0), default=None,
    metavar="INDEX",
    help="Multi-optimizer checkpoints: only the optimizer with this index (default: all).")
WAIT_OPT = click.option(
    "--wait", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
    help="If another edit holds the checkpoint's lock, wait up to SECONDS for it.")
_STALE_RETRIES = 5
VERIFY_LOAD_OPT = click.option(
    "--verify-load", is_flag=True,
    help="Also load every new file with torch.load(weights_only=True, mmap=True) before "
         "replacing anything (slower; the built-in check already compares every value).")
VERBOSE_OPT = click.option("-v", "--verbose", is_flag=True, help="Show more detail.")
JSON_OPT = click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON document on stdout (schema in the README).")


# ---------------------------------------------------------------------------------------------
# Rendering helpers


def _echo_json(document: dict[str, Any]) -> None:
    click.echo(json.dumps(document, indent=2, allow_nan=False))


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{size} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{size} B"  # unreachable; keeps type checkers content


def _warn(message: str) -> None:
    click.echo(f"Warning: {message}", err=True)


class _ProgressBar:
    """A one-line bar on stderr, drawn only on a terminal and only for work over a second."""

    _WIDTH = 24
    _DELAY = 1.0

    def __init__(self) -> None:
        self._started = time.monotonic()
        self._drawn = False

    def __call__(self, message: str, done: int, total: int) -> None:
        if time.monotonic() - self._started < self._DELAY:
            return
        finished = total > 0 and done + 1 >= total
        filled = self._WIDTH * (done + 1) // total if total else self._WIDTH
        bar = "#" * filled + "-" * (self._WIDTH - filled)
        click.echo(f"\r\033[K[{bar}] {done + 1}/{total} {message}"[:200], err=True, nl=False)
        self._drawn = True
        if finished:
            self.close()

    def close(self) -> None:
        if self._drawn:
            click.echo("", err=True)
            self._drawn = False


def _progress(verbose: bool, quiet: bool) -> Callable[[str, int, int], None] | None:
    """Progress on stderr: a bar on a terminal, log lines with -v, nothing with -q/--json."""
    if quiet:
        return None
    if verbose:
        def log(message: str, done: int, total: int) -> None:
            click.echo(f"[{done + 1}/{total}] {message}" if total else message, err=True)

        return log
    if not sys.stderr.isatty():
        return None
    return _ProgressBar()


def _complete_component(ctx: click.Context, param: click.Parameter,
                        incomplete: str) -> list[str]:
    """Shell completion: the components of the CHECKPOINT already on the command line."""
    from .discovery import discover_components

    paths = list(ctx.params.get("checkpoint_paths") or ())
    if ctx.params.get("checkpoint_path"):
        paths.append(ctx.params["checkpoint_path"])
    # While completing, click leaves a variadic CHECKPOINT... argument unparsed in ctx.args.
    paths.extend(ctx.args)
    names: list[str] = []
    for path in paths:
        if not path:
            continue
        try:
            names = list(discover_components(Path(path)).components)
        except (CheckpointToolError, OSError):
            continue
        break
    if not names:
        names = ["optimizer", "scheduler", "trainer", "dataset", "rng"]
    return [name for name in names if name.startswith(incomplete)]


# ---------------------------------------------------------------------------------------------
# components


@checkpoint.command()
@CHECKPOINT_ARG
@VERBOSE_OPT
@JSON_OPT
def components(checkpoint_path: Path, verbose: bool, as_json: bool) -> None:
    """List the components of a checkpoint and their files.

    Shows each component's sharing pattern (from checkpoint_manifest.json when present,
    otherwise inferred from the file names), file count and total size. Model weights and
    other files are listed apart: this tool never edits them (the manifest is only kept up to
    date by modify).

    \b
    Example:
      forgather checkpoint components checkpoints/checkpoint-10000 -v
    """
    from .operations import inspect_checkpoint

    info = inspect_checkpoint(checkpoint_path)
    pending = _pending_commit(info.path)
    if as_json:
        _echo_json(_components_json(info, pending))
        return
    click.echo(f"Checkpoint: {info.path.resolve()}")
    manifest = "none (patterns inferred from file names)"
    if info.manifest_path.exists():
        manifest = f"{info.manifest_path.name} (kept up to date by modify)"
    click.echo(f"Manifest: {manifest}")
    click.echo("")
    click.echo(f"Found {len(info.components)} component(s):")
    for component in info.components.values():
        click.echo("")
        click.echo(f"  {component.key}")
        source = "manifest" if component.from_manifest else "file names"
        click.echo(f"    Pattern: {component.sharing_pattern} (from {source})")
        click.echo(f"    Files: {len(component.files)}")
        click.echo(f"    Size: {_human_size(component.size_bytes)}")
        if verbose:
            for file in component.files:
                click.echo(f"      {file.name}  {_human_size(file.size_bytes)}")
        for name in component.missing:
            click.echo(f"    MISSING: {name}")
    if info.other_files:
        click.echo("")
        click.echo("Other files (never edited):")
        for path in info.other_files:
            suffix = "/" if path.is_dir() else ""
            click.echo(f"  {path.name}{suffix}")
    if info.backup_files:
        click.echo("")
        click.echo("Backups:")
        for path in info.backup_files:
            click.echo(f"  {path.name}")
    if info.manifest_error:
        _warn(f"manifest cannot be loaded by Forgather: {info.manifest_error}")
    for path in info.temp_files:
        _warn(f"leftover temp file from an interrupted edit: {path.name} "
              f"(run 'forgather checkpoint recover {info.path}')")
    if pending:
        _warn(f"an edit of this checkpoint was interrupted ({pending}); "
              f"run 'forgather checkpoint recover {info.path}'")


def _pending_commit(path: Path) -> str | None:
    from .writer import pending_commit

    state = pending_commit(path)
    if state is None:
        return None
    who = f", held by {state.holder.describe()}" if state.in_progress and state.holder else ""
    return (f"commit {state.commit_id or '(not journaled)'} in phase {state.phase}; "
            f"next step: {state.next_step}{who}")


def _components_json(info: Any, pending: str | None) -> dict[str, Any]:
    return {
        "schema": "forgather-checkpoint.components",
        "version": JSON_SCHEMA_VERSION,
        "checkpoint": str(info.path.resolve()),
        "has_manifest": info.manifest is not None,
        "manifest_error": info.manifest_error,
        "components": [
            {
                "name": c.key,
                "sharing_pattern": c.sharing_pattern,
                "pattern_source": "manifest" if c.from_manifest else "file_names",
                "file_count": len(c.files),
                "size_bytes": c.size_bytes,
                "files": [
                    {"name": f.name, "size_bytes": f.size_bytes, "rank": f.rank,
                     "group_name": f.group_name, "group_rank": f.group_rank,
                     "node_rank": f.node_rank}
                    for f in c.files
                ],
                "missing_files": list(c.missing),
            }
            for c in info.components.values()
        ],
        "other_files": [p.name for p in info.other_files],
        "backup_files": [p.name for p in info.backup_files],
        "temp_files": [p.name for p in info.temp_files],
        "interrupted_commit": pending,
    }


# ---------------------------------------------------------------------------------------------
# list


@checkpoint.command(name="list")
@CHECKPOINTS_ARG
@click.option("--component", "-c", default="optimizer", show_default=True,
              shell_complete=_complete_component, help="Component to inspect.")
@OPTIMIZER_OPT
@VERBOSE_OPT
@JSON_OPT
def list_command(checkpoint_paths: tuple[Path, ...], component: str,
                 optimizer_index: int | None, verbose: bool, as_json: bool) -> None:
    """List the values of a component that can be modified.

    Optimizer: each param group's hyperparameters. Other components: every value, nested ones
    as dotted paths (e.g. _schedulers.0.base_lrs) usable as KEY in 'modify'. Tensors are
    described (dtype, shape), never printed. Every file is read; where rank files disagree,
    each value is shown with the files that hold it. Several CHECKPOINTs (or a quoted glob)
    are listed one after another.

    \b
    Examples:
      forgather checkpoint list checkpoints/checkpoint-10000
      forgather checkpoint list checkpoints/checkpoint-10000 --component scheduler -v
      forgather checkpoint list 'checkpoints/checkpoint-*' --json
    """
    from .operations import list_component

    paths = _expand_checkpoints(checkpoint_paths)
    single = len(paths) == 1
    outcomes: list[dict[str, Any]] = []
    for index, path in enumerate(paths):
        try:
            info, chosen, listing = list_component(path, component,
                                                   _progress(verbose, quiet=as_json))
            if optimizer_index is not None:
                listing = _only_optimizer(listing, optimizer_index, path)
        except CheckpointToolError as exc:
            if single:
                raise
            outcomes.append({"checkpoint": str(path), "status": "failed", "error": str(exc)})
            if not as_json:
                click.echo(f"Error: {path}: {exc}", err=True)
            continue
        outcomes.append(_listing_json(info, chosen, listing))
        if not as_json:
            if not single:
                click.echo(("" if index == 0 else "\n") + f"== {info.path} ==")
            _show_listing(chosen, listing, verbose)
    if as_json:
        _echo_json(outcomes[0] if single else _batch_json("list", outcomes))
    if any(o.get("status") == "failed" for o in outcomes):
        raise click.exceptions.Exit(1)


def _only_optimizer(listing: Any, index: int, path: Path) -> Any:
    from dataclasses import replace

    if all(entry.optimizer is None for entry in listing.entries):
        raise UsageProblem(f"--optimizer applies to multi-optimizer checkpoints; {path} holds "
                           "a single optimizer")
    entries = tuple(e for e in listing.entries if e.optimizer in (index, None)
                    and not (e.optimizer is None and e.group is not None))
    if not any(e.optimizer == index for e in entries):
        raise CheckpointToolError(f"optimizer {index} does not exist in {path}")
    return replace(listing, entries=entries)


def _listing_json(info: Any, chosen: Any, listing: Any) -> dict[str, Any]:
    from .listing import format_value, to_json_value, type_name

    return {
        "schema": "forgather-checkpoint.list",
        "version": JSON_SCHEMA_VERSION,
        "status": "done",
        "checkpoint": str(info.path.resolve()),
        "component": chosen.key,
        "sharing_pattern": chosen.sharing_pattern,
        "files": list(listing.files),
        "consistent": listing.consistent,
        "notes": list(listing.notes),
        "entries": [
            {
                "optimizer": entry.optimizer,
                "group": entry.group,
                "key": entry.key,
                "consistent": entry.consistent,
                "values": [
                    {"value": to_json_value(v.value), "repr": format_value(v.value),
                     "type": type_name(v.value), "files": list(v.files)}
                    for v in entry.variants
                ],
                "absent_from": list(entry.absent_from),
            }
            for entry in listing.entries
        ],
    }


def _show_listing(chosen: Any, listing: Any, verbose: bool) -> None:
    from .listing import format_value, type_name

    for note in listing.notes:
        _warn(note)
    click.echo(f"Component: {chosen.key}")
    click.echo(f"Files: {', '.join(listing.files)}")
    if verbose:
        click.echo(f"Pattern: {chosen.sharing_pattern}")
    section: tuple[int | None, int | None] | None = None
    if not listing.has_param_groups:
        click.echo("")
    for entry in listing.entries:
        here = (entry.optimizer, entry.group)
        if listing.has_param_groups and here != section:
            section = here
            click.echo("")
            if entry.group is None:
                click.echo("Other values:")
            elif entry.optimizer is None:
                click.echo(f"Param group {entry.group}:")
            else:
                click.echo(f"Optimizer {entry.optimizer}, param group {entry.group}:")
        indent = "  " if listing.has_param_groups else ""
        if entry.consistent:
            value = entry.variants[0].value
            kind = f"  ({type_name(value)})" if verbose else ""
            click.echo(f"{indent}{entry.key}: {format_value(value)}{kind}")
            continue
        click.echo(f"{indent}{entry.key}: differs between files:")
        for variant in entry.variants:
            kind = f" ({type_name(variant.value)})" if verbose else ""
            click.echo(f"{indent}    {format_value(variant.value)}{kind}  "
                       f"in {', '.join(variant.files)}")
        if entry.absent_from:
            click.echo(f"{indent}    (absent)  in {', '.join(entry.absent_from)}")
    if not listing.consistent and chosen.sharing_pattern in ("global", "replicated"):
        _warn(f"the files of {chosen.key} disagree on some values (shown per file above)")


# ---------------------------------------------------------------------------------------------
# modify


def _edit_specs(kind: str) -> Callable[[click.Context, click.Parameter, Sequence[str]], Any]:
    from .editor import parse_edit_spec

    def callback(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> Any:
        specs = []
        for text in values:
            try:
                specs.append(parse_edit_spec(text, kind))  # type: ignore[arg-type]
            except EditSpecError as exc:
                raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        return tuple(specs)

    return callback


@checkpoint.command()
@CHECKPOINTS_ARG
@click.option("--component", "-c", required=True, shell_complete=_complete_component,
              help="Component to modify (e.g. optimizer, scheduler; see 'components').")
@click.option("--set", "set_specs", multiple=True, metavar="KEY=VALUE",
              callback=_edit_specs("set"),
              help="Set KEY to a Python literal: 0.01, 1e-4, True, \"(0.9,0.98)\", \"'adam'\".")
@click.option("--scale", "scale_specs", multiple=True, metavar="KEY=FACTOR",
              callback=_edit_specs("scale"),
              help="Multiply a number (or each number of a list, e.g. base_lrs) by FACTOR.")
@click.option("--param-group", type=click.IntRange(min=0), default=None, metavar="INDEX",
              help="Optimizer only: edit just this param group (default: all groups).")
@OPTIMIZER_OPT
@click.option("--dry-run", is_flag=True, help="Show the planned changes; write nothing.")
@click.option("--no-backup", is_flag=True,
              help="Do not keep a backup of the originals (the commit is still atomic).")
@click.option("--force", "-f", is_flag=True, help="Do not ask for confirmation.")
@WAIT_OPT
@VERIFY_LOAD_OPT
@VERBOSE_OPT
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@JSON_OPT
def modify(
    checkpoint_paths: tuple[Path, ...],
    component: str,
    set_specs: tuple[Any, ...],
    scale_specs: tuple[Any, ...],
    param_group: int | None,
    optimizer_index: int | None,
    dry_run: bool,
    no_backup: bool,
    force: bool,
    wait: float,
    verify_load: bool,
    verbose: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Modify values of a component in every one of its files.

    KEY is a parameter name (for the optimizer: a param group key such as lr) or a dotted
    path into nested state (e.g. _schedulers.0.base_lrs). --set keeps a value's kind
    (ints stay ints, tuples stay tuples, bools take only True/False); --scale multiplies
    numbers and lists of numbers. Optimizer 'params' and 'state', and tensors, are never
    edited.

    The plan is shown per file and param group, then confirmed (--force skips the prompt;
    without a terminal --force is required). Every file of the component is staged,
    validated and only then replaced, as one unit; originals are kept as backups
    (FILE.bak holds the pre-first-edit bytes). checkpoint_manifest.json is updated.

    \b
    Examples:
      forgather checkpoint modify ckpt/ --component optimizer --set weight_decay=0.01
      forgather checkpoint modify ckpt/ -c optimizer --scale lr=0.5 --param-group 0 --dry-run
      forgather checkpoint modify ckpt/ -c scheduler --set last_epoch=5000 --force
    """
    from .operations import prepare_modify

    if verbose and quiet:
        raise click.UsageError("--verbose and --quiet cannot be combined")
    specs = list(set_specs) + list(scale_specs)
    if not specs:
        raise click.UsageError(
            "give at least one modification: --set KEY=VALUE or --scale KEY=FACTOR"
        )
    progress = _progress(verbose, quiet or as_json)

    def prepare(path: Path) -> Any:
        return prepare_modify(path, component, specs, param_group, progress,
                              optimizer_index=optimizer_index, wait=wait)

    _edit_checkpoints("modify", _expand_checkpoints(checkpoint_paths), prepare,
                      _EditOptions(dry_run, not no_backup, force, wait, verbose, quiet, as_json,
                                   progress, verify_load))


@dataclass(frozen=True)
class _EditOptions:
    dry_run: bool
    backup: bool
    force: bool
    wait: float
    verbose: bool
    quiet: bool
    as_json: bool
    progress: Callable[[str, int, int], None] | None
    verify_load: bool = False


def _edit_checkpoints(command: str, paths: list[Path], prepare: Callable[[Path], Any],
                      options: _EditOptions) -> None:
    """Plan every checkpoint, show the plans, confirm once, commit each as its own transaction.

    One checkpoint: its errors are the command's errors. Several: a failure is recorded, the
    others go on, a summary follows and the exit status is 1 if any failed.
    """
    from .operations import apply_modify

    single = len(paths) == 1
    outcomes: list[dict[str, Any]] = []
    plans: list[tuple[Path, Any]] = []
    for path in paths:
        try:
            plan = prepare(path)
        except CheckpointToolError as exc:
            if single:
                raise
            outcomes.append(_failure(path, exc, options))
            continue
        plans.append((path, plan))
        if not options.quiet:
            for warning in plan.warnings:
                _warn(f"{path}: {warning}" if not single else warning)
        if not options.as_json and not options.quiet:
            if not single:
                click.echo("")
            _show_plan(plan, options.verbose)

    pending = [(path, plan) for path, plan in plans if plan.has_changes]
    if options.dry_run or not pending:
        for _path, plan in plans:
            status = "dry_run" if options.dry_run else "unchanged"
            outcomes.append(_modify_json(plan, dry_run=options.dry_run, result=None,
                                         status=status))
        if not options.as_json and not options.quiet and plans:
            click.echo("")
            click.echo("Dry run: nothing was written." if options.dry_run
                       else "Nothing to change: every value already has the requested value.")
        _finish(command, paths, outcomes, options)
        return
    if not options.force:
        _confirm([plan for _, plan in pending])
    for path, plan in plans:
        if not plan.has_changes:
            outcomes.append(_modify_json(plan, dry_run=False, result=None, status="unchanged"))
            continue
        try:
            plan, result = _commit_with_retries(path, plan, prepare, options, apply_modify)
        except CheckpointToolError as exc:
            if single:
                raise
            outcomes.append(_failure(path, exc, options))
            continue
        outcomes.append(_modify_json(plan, dry_run=False, result=result, status="done"))
        if not options.as_json:
            _report_commit(plan, result, options.quiet)
    _finish(command, paths, outcomes, options)


def _commit_with_retries(path: Path, plan: Any, prepare: Callable[[Path], Any],
                         options: _EditOptions, apply: Callable[..., Any]) -> tuple[Any, Any]:
    for attempt in range(_STALE_RETRIES):
        try:
            return plan, apply(plan, backup=options.backup, wait=options.wait,
                               progress=options.progress, verify_load=options.verify_load)
        except StaleReadError:
            # Another editor committed between our read and our commit. With --force the
            # user asked for these edits whatever the current values: plan them again.
            if not options.force or attempt == _STALE_RETRIES - 1:
                raise
            plan = prepare(path)
    raise AssertionError("unreachable")


def _failure(path: Path, exc: CheckpointToolError, options: _EditOptions) -> dict[str, Any]:
    if not options.as_json:
        click.echo(f"Error: {path}: {exc}", err=True)
    return {"checkpoint": str(path), "status": "failed", "error": str(exc)}


def _finish(command: str, paths: list[Path], outcomes: list[dict[str, Any]],
            options: _EditOptions) -> None:
    failed = sum(1 for o in outcomes if o.get("status") == "failed")
    if options.as_json:
        if len(paths) == 1:
            _echo_json(outcomes[0])
        else:
            _echo_json(_batch_json(command, outcomes))
    elif len(paths) > 1 and not options.quiet:
        counts = _batch_counts(outcomes)
        click.echo("")
        click.echo(f"Summary: {counts['done']} done, {counts['skipped']} skipped, "
                   f"{counts['failed']} failed ({len(paths)} checkpoints)")
    if failed:
        raise click.exceptions.Exit(1)


def _batch_counts(outcomes: list[dict[str, Any]]) -> dict[str, int]:
    done = sum(1 for o in outcomes if o.get("status") == "done")
    failed = sum(1 for o in outcomes if o.get("status") == "failed")
    return {"done": done, "failed": failed, "skipped": len(outcomes) - done - failed}


def _batch_json(command: str, outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "schema": "forgather-checkpoint.batch",
        "version": JSON_SCHEMA_VERSION,
        "command": command,
        "results": outcomes,
        "summary": _batch_counts(outcomes),
    }


_GLOB_CHARS = set("*?[")


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _expand_checkpoints(values: Sequence[Path]) -> list[Path]:
    """CHECKPOINT arguments, with quoted shell globs expanded (checkpoint-100 after -99)."""
    paths: list[Path] = []
    for value in values:
        text = str(value)
        if not Path(text).exists() and _GLOB_CHARS & set(text):
            matches = sorted((Path(m) for m in glob.glob(text)), key=_natural_key)
            if not matches:
                raise click.BadParameter(f"no checkpoint matches {text!r}",
                                         param_hint="CHECKPOINT")
            paths.extend(matches)
        else:
            paths.append(Path(text))
    unique: list[Path] = []
    for path in paths:
        if path not in unique:
            unique.append(path)
    return unique


def _report_commit(plan: Any, result: Any, quiet: bool) -> None:
    if quiet:
        return
    click.echo("")
    files = len(plan.changed_files)
    keys = ", ".join(part.component.key for part in plan.parts)
    click.echo(f"Modified {files} file(s) of {keys} in {plan.info.path} "
               f"(history entry {result.commit_id}).")
    for line in _result_lines(result):
        click.echo(line)


def _confirm(plans: Sequence[Any]) -> None:
    from .errors import AbortedError, ConfirmationRequiredError

    if not sys.stdin.isatty():
        raise ConfirmationRequiredError(
            "refusing to modify without confirmation: there is no terminal to ask; "
            "review the plan with --dry-run, then pass --force"
        )
    changes = sum(plan.change_count for plan in plans)
    files = sum(len(plan.changed_files) for plan in plans)
    where = f" in {len(plans)} checkpoints" if len(plans) > 1 else ""
    if not click.confirm(f"Apply {changes} change(s) to {files} file(s){where}?", default=False,
                         err=True):
        raise AbortedError("aborted at the prompt; nothing was changed")


def _show_plan(plan: Any, verbose: bool) -> None:
    from .listing import format_value

    click.echo(f"Checkpoint: {plan.info.path}")
    for part in plan.parts:
        component = part.component
        click.echo(f"Component: {component.key} ({component.sharing_pattern}, "
                   f"{len(component.files)} file(s))")
    click.echo("")
    click.echo("Planned changes:")
    for part in plan.parts:
        for file_plan in part.edit_plan.files:
            click.echo(f"  {file_plan.document.path.name}")
            by_location: dict[str, list[Any]] = {}
            for change in file_plan.changes:
                by_location.setdefault(change.location, []).append(change)
            if not by_location:
                click.echo("    (nothing to change)")
            for location, changes in by_location.items():
                if location:
                    click.echo(f"    {location}:")
                indent = "      " if location else "    "
                for change in changes:
                    note = "" if change.changed else "  (unchanged)"
                    click.echo(f"{indent}{change.key}: {format_value(change.old)} -> "
                               f"{format_value(change.new)}{note}")


def _result_lines(result: Any) -> list[str]:
    return [f"Backup: {backup.path} ({backup.method})" for backup in result.backups]


def _modify_json(plan: Any, *, dry_run: bool, result: Any, status: str) -> dict[str, Any]:
    from .listing import to_json_value

    backups = [str(backup.path) for backup in result.backups] if result is not None else []
    return {
        "schema": f"forgather-checkpoint.{plan.command}",
        "version": JSON_SCHEMA_VERSION,
        "checkpoint": str(plan.info.path.resolve()),
        "component": plan.component.key,
        "components": [part.component.key for part in plan.parts],
        "status": status,
        "dry_run": dry_run,
        "applied": result is not None,
        "commit_id": result.commit_id if result is not None else None,
        "warnings": list(plan.warnings),
        "files": [
            {
                "name": fp.document.path.name,
                "changed": fp.changed,
                "changes": [
                    {"optimizer": c.optimizer, "group": c.group, "key": c.key,
                     "old": to_json_value(c.old), "new": to_json_value(c.new),
                     "changed": c.changed}
                    for c in fp.changes
                ],
            }
            for part in plan.parts
            for fp in part.edit_plan.files
        ],
        "backups": backups,
    }


# ---------------------------------------------------------------------------------------------
# lr


def _finite_number(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    from .editor import parse_literal

    try:
        number = parse_literal(value)
    except EditSpecError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise click.BadParameter(f"{value!r} is not a number", ctx=ctx, param=param)
    if not math.isfinite(number) or (param.name == "set_value" and number <= 0):
        raise click.BadParameter(f"{value!r} must be a finite positive number", ctx=ctx,
                                 param=param)
    if param.name == "scale" and number < 0:
        raise click.BadParameter(f"{value!r} must not be negative", ctx=ctx, param=param)
    return float(number)


@checkpoint.command(name="lr")
@CHECKPOINTS_ARG
@click.option("--set", "set_value", metavar="VALUE", callback=_finite_number,
              help="New base learning rate for each targeted group.")
@click.option("--scale", "scale", metavar="FACTOR", callback=_finite_number,
              help="Multiply every learning-rate field of each targeted group by FACTOR.")
@click.option("--param-group", type=click.IntRange(min=0), default=None, metavar="INDEX",
              help="Change only this param group (default: all groups).")
@click.option("--dry-run", is_flag=True, help="Show every field that would change; write nothing.")
@click.option("--no-backup", is_flag=True, help="Do not keep backups of the originals.")
@click.option("--force", "-f", is_flag=True, help="Do not ask for confirmation.")
@WAIT_OPT
@VERIFY_LOAD_OPT
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@JSON_OPT
def lr_command(checkpoint_paths: tuple[Path, ...], set_value: float | None, scale: float | None,
               param_group: int | None, dry_run: bool, no_backup: bool, force: bool,
               wait: float, verify_load: bool, quiet: bool, as_json: bool) -> None:
    """Change the learning rate for the rest of training.

    Optimizer and scheduler are changed together.
    Schedulers recompute each group's lr from their base_lrs on every step, so editing only
    the optimizer's lr lasts one step. This command changes, as one transaction, everything
    that decides the learning rate from the next step on: each group's lr and initial_lr (and
    max_lr/min_lr where present), the scheduler's base_lrs and _last_lr (nested
    _schedulers too) and absolute floors/peaks such as eta_min, so training continues exactly
    as a run that had used the new learning rate from the start. --scale F multiplies them all
    by F; --set V is --scale V/base for each group, base being the group's initial_lr (else
    the scheduler's base_lrs, else lr), so peaks and floors move in proportion.

    \b
    Examples:
      forgather checkpoint lr checkpoints/checkpoint-10000 --scale 0.5 --dry-run
      forgather checkpoint lr checkpoints/checkpoint-10000 --set 3e-4 --force
    """
    from .operations import prepare_lr_change

    if (set_value is None) == (scale is None):
        raise click.UsageError("give exactly one of --set VALUE or --scale FACTOR")
    progress = _progress(False, quiet or as_json)

    def prepare(path: Path) -> Any:
        return prepare_lr_change(path, set_value=set_value, scale=scale,
                                 param_group=param_group, progress=progress, wait=wait)

    _edit_checkpoints("lr", _expand_checkpoints(checkpoint_paths), prepare,
                      _EditOptions(dry_run, not no_backup, force, wait, False, quiet, as_json,
                                   progress, verify_load))


# ---------------------------------------------------------------------------------------------
# diff, verify


class _ExitTwo(click.ClickException):
    """An error for commands whose exit status 1 already means "found a difference"."""

    exit_code = 2


@checkpoint.command()
@click.argument("checkpoint_a", metavar="A", type=click.Path(path_type=Path))
@click.argument("checkpoint_b", metavar="[B]", required=False, type=click.Path(path_type=Path))
@click.option("--component", "-c", default=None, shell_complete=_complete_component,
              help="Compare only this component (default: all; required with --ranks).")
@click.option("--ranks", is_flag=True,
              help="Compare the rank files of one checkpoint with each other (A only).")
@JSON_OPT
def diff(checkpoint_a: Path, checkpoint_b: Path | None, component: str | None, ranks: bool,
         as_json: bool) -> None:
    """Compare two checkpoints, or the rank files of one.

    Shows every non-tensor value that differs.
    Per file and param group, with A's and B's values; files or components on one side only
    are reported. Tensors are compared by dtype and shape, not contents. With --ranks, the
    rank files of one checkpoint are compared with its first rank file.

    Exit status (like diff): 0 equal, 1 different, 2 error.

    \b
    Examples:
      forgather checkpoint diff checkpoint-10000 checkpoint-10000-edited
      forgather checkpoint diff run-a/checkpoint-500 run-b/checkpoint-500 -c scheduler --json
      forgather checkpoint diff checkpoint-10000 --ranks --component optimizer
    """
    from .diffing import diff_checkpoints, diff_ranks

    try:
        if ranks:
            if checkpoint_b is not None:
                raise click.UsageError("--ranks compares the rank files of ONE checkpoint")
            result = diff_ranks(checkpoint_a, component or "optimizer")
        else:
            if checkpoint_b is None:
                raise click.UsageError("give two checkpoints A B (or one with --ranks)")
            result = diff_checkpoints(checkpoint_a, checkpoint_b, component)
    except CheckpointToolError as exc:
        raise _ExitTwo(str(exc)) from exc
    if as_json:
        _echo_json(result.to_json())
    else:
        _show_diff(result)
    if not result.equal:
        raise click.exceptions.Exit(1)


def _show_diff(result: Any) -> None:
    from .listing import format_value

    label_a, label_b = ("first rank", "this rank") if result.mode == "ranks" else ("A", "B")
    click.echo(f"A: {result.a}")
    click.echo(f"B: {result.b}")
    for item in result.only_in_a:
        click.echo(f"only in A: {item.component}" + (f" {item.file}" if item.file else ""))
    for item in result.only_in_b:
        click.echo(f"only in B: {item.component}" + (f" {item.file}" if item.file else ""))
    for difference in result.differences:
        a = format_value(difference.a) if difference.in_a else f"(absent in {label_a})"
        b = format_value(difference.b) if difference.in_b else f"(absent in {label_b})"
        click.echo(f"{difference.component}: {difference.location}: {a} -> {b}")
    if result.equal:
        click.echo(f"No differences ({result.files_compared} file(s) compared).")
    else:
        count = len(result.differences) + len(result.only_in_a) + len(result.only_in_b)
        click.echo(f"{count} difference(s) ({result.files_compared} file(s) compared).")


@checkpoint.command()
@CHECKPOINTS_ARG
@JSON_OPT
def verify(checkpoint_paths: tuple[Path, ...], as_json: bool) -> None:
    """Check a checkpoint the way a Forgather resume will.

    The manifest loads under Forgather's strict rules; every component it lists has all its
    files for its pattern and ranks; replicated files agree; every file decodes; size_bytes
    matches (per-rank sizes are Forgather's estimate and reported as such); leftover temp
    files, interrupted edits and missing ranks are reported. One line per problem.

    Exit status: 0 no problem, 1 problems found, 2 not a checkpoint.

    \b
    Examples:
      forgather checkpoint verify checkpoints/checkpoint-10000
      forgather checkpoint verify 'checkpoints/checkpoint-*' --json
    """
    from .verification import verify_checkpoint

    paths = _expand_checkpoints(checkpoint_paths)
    reports = []
    unreadable = 0
    for path in paths:
        try:
            report = verify_checkpoint(path)
        except CheckpointToolError as exc:
            if len(paths) == 1:
                raise _ExitTwo(str(exc)) from exc
            unreadable += 1
            reports.append({"checkpoint": str(path), "status": "failed", "error": str(exc)})
            if not as_json:
                click.echo(f"Error: {path}: {exc}", err=True)
            continue
        data = report.to_json()
        data["status"] = "done" if report.clean else "problems"
        reports.append(data)
        if not as_json:
            _show_verify(report)
    if as_json:
        _echo_json(reports[0] if len(paths) == 1 else _batch_json("verify", reports))
    if unreadable:
        raise click.exceptions.Exit(2)
    if any(r.get("status") != "done" for r in reports):
        raise click.exceptions.Exit(1)


def _show_verify(report: Any) -> None:
    for problem in report.problems:
        where = ": ".join(part for part in (problem.component, problem.file) if part)
        click.echo(f"{report.path}: {problem.severity}: {where + ': ' if where else ''}"
                   f"{problem.message}")
    for note in report.notes:
        where = ": ".join(part for part in (note.component, note.file) if part)
        click.echo(f"{report.path}: note: {where + ': ' if where else ''}{note.message}",
                   err=True)
    if report.clean:
        click.echo(f"{report.path}: OK ({report.files_decoded} file(s) decoded)")


# ---------------------------------------------------------------------------------------------
# recover, history, restore


@checkpoint.command()
@CHECKPOINT_ARG
@WAIT_OPT
@JSON_OPT
def recover(checkpoint_path: Path, wait: float, as_json: bool) -> None:
    """Finish or undo an interrupted edit (crash, kill, power loss).

    An edit is committed through a journal: if it stopped before its commit point it is
    undone, otherwise it is finished, so every file is either all as before or all as
    intended. Leftover temp files are removed. Safe to run at any time and to repeat; every
    other command that touches a checkpoint also does this first.

    \b
    Example:
      forgather checkpoint recover checkpoints/checkpoint-10000
    """
    from .operations import inspect_checkpoint
    from .writer import recover as recover_checkpoint

    info = inspect_checkpoint(checkpoint_path)
    result = recover_checkpoint(info.path, wait=wait)
    if as_json:
        _echo_json({
            "schema": "forgather-checkpoint.recover",
            "version": JSON_SCHEMA_VERSION,
            "checkpoint": str(info.path.resolve()),
            "action": result.action if result else "none",
            "commit_id": result.commit_id if result else None,
            "files": [str(p) for p in result.files] if result else [],
            "removed_temp_files": [str(p) for p in result.removed_temp_files] if result else [],
        })
        return
    if result is None:
        click.echo(f"Nothing to recover in {info.path}.")
        return
    click.echo(f"Recovered {info.path}: {result.action}"
               + (f" (commit {result.commit_id})" if result.commit_id else ""))
    for path in result.files:
        click.echo(f"  {path}")
    for path in result.removed_temp_files:
        click.echo(f"  removed temp file {path.name}")


@checkpoint.command()
@CHECKPOINT_ARG
@JSON_OPT
def history(checkpoint_path: Path, as_json: bool) -> None:
    """Show the edits made to a checkpoint, oldest first.

    Each entry has an id (for 'restore --to ID'), time, user, host, what was changed
    (old -> new) and where each file's previous bytes are kept.

    \b
    Example:
      forgather checkpoint history checkpoints/checkpoint-10000
    """
    from .operations import inspect_checkpoint
    from .writer import read_history

    info = inspect_checkpoint(checkpoint_path)
    entries = read_history(info.path)
    if as_json:
        _echo_json({
            "schema": "forgather-checkpoint.history",
            "version": JSON_SCHEMA_VERSION,
            "checkpoint": str(info.path.resolve()),
            "entries": [_history_json(entry) for entry in entries],
        })
        return
    if not entries:
        click.echo(f"No edits recorded for {info.path}.")
        return
    for entry in entries:
        record = dict(entry.record)
        what = record.get("text") or f"{entry.action} {record.get('component', '')}".strip()
        click.echo(f"{entry.id}  {entry.time}  {entry.user}@{entry.host}  {what}")
        for change in record.get("changes", []) or []:
            if "key" in change:
                where = f" group {change['group']}" if change.get("group") is not None else ""
                click.echo(f"    {change.get('file')}{where}: {change['key']}: "
                           f"{change.get('old')!r} -> {change.get('new')!r}")
        for file in entry.files:
            kept = f" (previous bytes: {file.backup})" if file.backup else ""
            click.echo(f"    file {file.path}{kept}")


def _history_json(entry: Any) -> dict[str, Any]:
    return {
        "id": entry.id,
        "time": entry.time,
        "user": entry.user,
        "host": entry.host,
        "pid": entry.pid,
        "action": entry.action,
        "record": dict(entry.record),
        "files": [
            {"path": f.path, "backup": f.backup, "backup_method": f.backup_method,
             "old": dict(f.old) if f.old is not None else None, "new": dict(f.new)}
            for f in entry.files
        ],
    }


@checkpoint.command()
@CHECKPOINT_ARG
@click.option("--to", "to", metavar="ID", default=None,
              help="Put files back to their state right after history entry ID.")
@click.option("--original", is_flag=True,
              help="Put every edited file back to its bytes before the first edit.")
@click.option("--dry-run", is_flag=True, help="Show what would be restored; write nothing.")
@click.option("--force", "-f", is_flag=True, help="Do not ask for confirmation.")
@WAIT_OPT
@JSON_OPT
def restore(checkpoint_path: Path, to: str | None, original: bool, dry_run: bool, force: bool,
            wait: float, as_json: bool) -> None:
    """Undo edits: put files back from their backups.

    Without --to or --original, undoes the last entry of 'history'. The restore is itself
    recorded in the history (so it can be undone too); backups are never deleted.

    \b
    Examples:
      forgather checkpoint restore checkpoints/checkpoint-10000 --dry-run
      forgather checkpoint restore checkpoints/checkpoint-10000 --original --force
    """
    from .errors import AbortedError, ConfirmationRequiredError
    from .operations import inspect_checkpoint
    from .writer import plan_restore
    from .writer import restore as restore_files

    if to and original:
        raise click.UsageError("give either --to ID or --original, not both")
    info = inspect_checkpoint(checkpoint_path)
    plan = plan_restore(info.path, to=to, original=original)
    items = [{"file": str(i.target), "from": str(i.source), "entry": i.entry_id}
             for i in plan.items]
    if not as_json:
        click.echo(f"Restore {info.path} to {plan.description}:")
        for item in plan.items:
            click.echo(f"  {item.target.name} <- {item.source}")
    if dry_run:
        if as_json:
            _echo_json({"schema": "forgather-checkpoint.restore", "version": JSON_SCHEMA_VERSION,
                        "checkpoint": str(info.path.resolve()), "dry_run": True,
                        "applied": False, "items": items, "commit_id": None})
        else:
            click.echo("Dry run: nothing was written.")
        return
    if not force:
        if not sys.stdin.isatty():
            raise ConfirmationRequiredError(
                "refusing to restore without confirmation: there is no terminal to ask; "
                "pass --force")
        if not click.confirm(f"Restore {len(plan.items)} file(s)?", default=False, err=True):
            raise AbortedError("aborted at the prompt; nothing was changed")
    result = restore_files(info.path, plan, wait=wait)
    if as_json:
        _echo_json({"schema": "forgather-checkpoint.restore", "version": JSON_SCHEMA_VERSION,
                    "checkpoint": str(info.path.resolve()), "dry_run": False, "applied": True,
                    "items": items, "commit_id": result.commit_id})
        return
    click.echo(f"Restored {len(plan.items)} file(s) (history entry {result.commit_id}).")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the stand-alone ``forgather-checkpoint`` script."""
    checkpoint.main(args=list(argv) if argv is not None else None,
                    prog_name="forgather-checkpoint")
