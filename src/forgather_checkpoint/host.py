"""The ``forgather`` front door: plugin commands, with everything else handed to Forgather core.

Plugins are click commands registered under the ``forgather.cli`` entry-point group (the name of
the entry point is the command name). Their names come from package metadata without importing
anything; a plugin is imported only when click asks for the command (to run it, or to show its
short help in ``forgather --help``). A plugin that fails to import becomes a placeholder command
that explains the failure and exits 1, so one broken plugin never breaks the others.

Any other invocation goes, with the argument list exactly as typed, to Forgather core's own CLI
(``forgather.cli.main:main``). Forgather's global options come before its command
(``forgather -t config.yaml train``), so an argument list that starts with an option other
than ``-h``/``--help`` is Forgather core's too. Plugin commands must therefore be the first
argument.

Exit status when Forgather core is needed but not importable: 1 (``Error: ...`` on stderr).
``forgather`` with no arguments shows this help and exits 2, as click does for a missing command.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click

PLUGIN_GROUP = "forgather.cli"
"""The entry-point group that plugin commands register under."""

CORE_MODULE = "forgather.cli.main"
"""Forgather core's CLI module; its ``main()`` parses ``sys.argv`` itself."""

CORE_NOT_INSTALLED_EXIT = 1
"""Exit status when a command needs Forgather core and it cannot be imported."""

_HELP_OPTIONS = ("-h", "--help")
_CORE_ARGV_KEY = "forgather_checkpoint.host.core_argv"
_CORE_PACKAGES = ("forgather", "forgather.cli", CORE_MODULE)


class BrokenPluginCommand(click.Command):
    """Stands in for a plugin that failed to import; every use explains why and exits 1."""

    def __init__(self, name: str, entry_point_value: str, error: BaseException) -> None:
        self.entry_point_value = entry_point_value
        self.error = error
        self.explanation = (
            f"the plugin command '{name}' (entry point '{name} = {entry_point_value}' in group "
            f"'{PLUGIN_GROUP}') failed to load: {type(error).__name__}: {error}"
        )
        super().__init__(
            name,
            callback=self._explain,
            params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
            help=f"Unavailable: {self.explanation}.",
            short_help=f"[broken plugin] {type(error).__name__}: {error}",
            add_help_option=False,
            context_settings={"ignore_unknown_options": True},
        )

    def _explain(self, args: tuple[str, ...]) -> NoReturn:
        click.echo(f"Error: {self.explanation}", err=True)
        click.echo(
            "Reinstall or upgrade the package that provides it, or uninstall it; "
            "'forgather --help' lists the commands that work.",
            err=True,
        )
        click.get_current_context().exit(1)


def _plugin_entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found: dict[str, importlib.metadata.EntryPoint] = {}
    # Called through the module path so that tests can patch it.
    for entry_point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        # With the same name installed twice, the first distribution found wins, like Python's
        # own import order.
        found.setdefault(entry_point.name, entry_point)
    return found


def forgather_installed() -> bool:
    """Whether Forgather core can be imported here (without importing it)."""
    # Only the top-level package is looked up: importing forgather.cli would import torch.
    try:
        return importlib.util.find_spec("forgather") is not None
    except (ImportError, ValueError):
        return False


class ForgatherGroup(click.Group):
    """A click group of lazily loaded ``forgather.cli`` plugins in front of Forgather core."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("context_settings", {"help_option_names": list(_HELP_OPTIONS)})
        super().__init__(*args, **kwargs)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(_plugin_entry_points()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        entry_point = _plugin_entry_points().get(cmd_name)
        if entry_point is None:
            return None
        # Not cached: after the first load the module is in sys.modules, so loading again is
        # cheap, and the metadata stays the single source of truth.
        return self._load_plugin(cmd_name, entry_point)

    @staticmethod
    def _load_plugin(name: str, entry_point: importlib.metadata.EntryPoint) -> click.Command:
        try:
            loaded = entry_point.load()
        except Exception as error:  # a broken plugin must not break the front door
            return BrokenPluginCommand(name, entry_point.value, error)
        if not isinstance(loaded, click.Command):
            not_a_command = TypeError(f"it is a {type(loaded).__name__}, not a click command")
            return BrokenPluginCommand(name, entry_point.value, not_a_command)
        return loaded

    def is_core_invocation(self, args: Sequence[str]) -> bool:
        """Whether `args` (everything after ``forgather``) belong to Forgather core."""
        if not args or args[0] in _HELP_OPTIONS:
            return False
        first = args[0]
        if first.startswith("-"):
            return True  # a Forgather core global option, e.g. -t config.yaml
        return first not in self.commands and first not in _plugin_entry_points()

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if self.is_core_invocation(args):
            # Bypass click's parsing entirely: core must see the arguments exactly as typed.
            ctx.meta[_CORE_ARGV_KEY] = list(args)
            return []
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        core_argv = ctx.meta.get(_CORE_ARGV_KEY)
        if core_argv is not None:
            return run_core(ctx, core_argv)
        return super().invoke(ctx)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        status = "installed" if forgather_installed() else "not installed"
        formatter.write_paragraph()
        formatter.write_text(
            "Any other command, and any argument list that starts with an option (such as "
            "'forgather -t config.yaml train'), is handed unchanged to Forgather core "
            f"({CORE_MODULE}). Plugin commands come first: 'forgather checkpoint ...'. "
            f"Forgather core is {status}."
        )


def _core_not_installed(ctx: click.Context, argv: Sequence[str]) -> NoReturn:
    group = ctx.command
    plugins = group.list_commands(ctx) if isinstance(group, click.Group) else []
    first = argv[0]
    if first.startswith("-"):
        what = f"'forgather {' '.join(argv)}' is for Forgather core (options before a command"
        what += " are Forgather core options)"
    else:
        what = f"'{first}' is a Forgather core command (not a plugin command)"
    click.echo(
        f"Error: {what}, and Forgather is not installed (cannot import {CORE_MODULE}).", err=True
    )
    close = difflib.get_close_matches(first, plugins, n=1)
    if close:
        click.echo(f"Did you mean '{close[0]}'?", err=True)
    available = ", ".join(plugins) if plugins else "none"
    click.echo(
        "Install Forgather into this environment (for example 'pip install -e "
        "/path/to/forgather' from its source tree) to use its commands. Without it only "
        f"plugin commands are available: {available}. See 'forgather --help'.",
        err=True,
    )
    ctx.exit(CORE_NOT_INSTALLED_EXIT)


def _import_core_main(ctx: click.Context, argv: Sequence[str]) -> Callable[[], Any]:
    try:
        module = importlib.import_module(CORE_MODULE)
    except ModuleNotFoundError as error:
        if error.name in _CORE_PACKAGES:
            _core_not_installed(ctx, argv)
        raise click.ClickException(
            f"Forgather core is installed but {CORE_MODULE} failed to import: "
            f"{type(error).__name__}: {error}"
        ) from error
    except Exception as error:
        raise click.ClickException(
            f"Forgather core is installed but {CORE_MODULE} failed to import: "
            f"{type(error).__name__}: {error}"
        ) from error
    core_main = getattr(module, "main", None)
    if not callable(core_main):
        raise click.ClickException(f"{CORE_MODULE} has no main() function")
    return core_main


def run_core(ctx: click.Context, argv: Sequence[str]) -> NoReturn:
    """Run Forgather core's CLI on `argv` (the arguments after ``forgather``), then exit.

    Core's ``main()`` reads ``sys.argv`` itself, so it is replaced for the call (and restored),
    with the program name kept: to core, it is as if it had been started directly.
    """
    core_main = _import_core_main(ctx, argv)
    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "forgather", *argv]
    try:
        result = core_main()
    finally:
        sys.argv = saved_argv
    ctx.exit(result if isinstance(result, int) else 0)


@click.group(cls=ForgatherGroup)
def forgather() -> None:
    """Forgather: ML training from configuration templates.

    The commands below are plugins (entry-point group 'forgather.cli').
    """


def main(argv: Sequence[str] | None = None) -> Any:
    """Console script ``forgather``."""
    return forgather.main(args=list(argv) if argv is not None else None, prog_name="forgather")
