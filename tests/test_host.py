"""The ``forgather`` front door: lazy plugins, broken plugins, hand-off to Forgather core."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from forgather_checkpoint import host
from forgather_checkpoint.host import CORE_NOT_INSTALLED_EXIT, forgather

LAZY_MODULE = "fake_lazy_forgather_plugin"


@click.command()
@click.argument("words", nargs=-1)
def good_command(words: tuple[str, ...]) -> None:
    """Say the words back. This second sentence is not short help."""
    click.echo("good: " + " ".join(words))


NOT_A_COMMAND = "just a string"


def entry_point(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=host.PLUGIN_GROUP)


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[importlib.metadata.EntryPoint]:
    """Replace the installed plugins with fakes: good, broken, not-a-command and lazy."""
    (tmp_path / f"{LAZY_MODULE}.py").write_text(
        textwrap.dedent(
            '''
            import click

            @click.command()
            def lazy():
                """Prove that importing happens only on demand."""
                click.echo("lazy ran")
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, LAZY_MODULE, raising=False)
    fakes = [
        entry_point("good", f"{__name__}:good_command"),
        entry_point("broken", "no_such_module_for_forgather_tests.cli:group"),
        entry_point("notcmd", f"{__name__}:NOT_A_COMMAND"),
        entry_point("lazy", f"{LAZY_MODULE}:lazy"),
        entry_point("good", "shadowed_duplicate.cli:group"),
    ]
    other = importlib.metadata.EntryPoint(name="x", value="x:y", group="console_scripts")

    def fake_entry_points(**selection: Any) -> list[importlib.metadata.EntryPoint]:
        return [ep for ep in [*fakes, other] if ep.group == selection.get("group")]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    return fakes


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def fake_core(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """An in-memory ``forgather.cli.main`` whose ``main()`` records ``sys.argv``."""
    record: dict[str, Any] = {"calls": [], "result": None, "exit": None}

    def main() -> Any:
        record["calls"].append(list(sys.argv))
        if record["exit"] is not None:
            sys.exit(record["exit"])
        return record["result"]

    package = types.ModuleType("forgather")
    package.__spec__ = importlib.machinery.ModuleSpec("forgather", None, is_package=True)
    cli_package = types.ModuleType("forgather.cli")
    module = types.ModuleType("forgather.cli.main")
    module.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "forgather", package)
    monkeypatch.setitem(sys.modules, "forgather.cli", cli_package)
    monkeypatch.setitem(sys.modules, "forgather.cli.main", module)
    yield record


@pytest.fixture
def no_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forgather core not importable, even if it happens to be installed."""
    monkeypatch.setitem(sys.modules, "forgather", None)


# --- plugins -------------------------------------------------------------------------------


def test_help_lists_every_plugin_with_short_help(plugins: Any, runner: CliRunner) -> None:
    result = runner.invoke(forgather, ["--help"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    good = next(line for line in lines if line.strip().startswith("good "))
    assert "Say the words back." in good and "second sentence" not in good
    broken = next(line for line in lines if line.strip().startswith("broken "))
    assert "broken plugin" in broken and "ModuleNotFoundError" in broken
    assert any(line.strip().startswith("notcmd ") for line in lines)
    assert any(line.strip().startswith("lazy ") for line in lines)
    assert "Forgather core" in result.stdout
    assert result.stderr == ""
    assert runner.invoke(forgather, ["-h"]).stdout == result.stdout


def test_names_come_from_metadata_without_importing(plugins: Any) -> None:
    group = forgather
    assert isinstance(group, host.ForgatherGroup)
    with click.Context(group) as ctx:
        assert group.list_commands(ctx) == ["broken", "good", "lazy", "notcmd"]
        assert LAZY_MODULE not in sys.modules
        command = group.get_command(ctx, "lazy")
        assert command is not None and command.name == "lazy"
        assert LAZY_MODULE in sys.modules
        assert group.get_command(ctx, "missing") is None


def test_good_plugin_runs_with_its_arguments(plugins: Any, runner: CliRunner) -> None:
    result = runner.invoke(forgather, ["good", "hello", "world"])
    assert result.exit_code == 0
    assert result.stdout == "good: hello world\n"
    help_result = runner.invoke(forgather, ["good", "--help"])
    assert help_result.exit_code == 0
    assert "Usage: forgather good" in help_result.stdout


@pytest.mark.parametrize("args", [[], ["--flag", "value"], ["--help"]])
def test_broken_plugin_explains_itself_and_exits_1(
    plugins: Any, runner: CliRunner, args: list[str]
) -> None:
    result = runner.invoke(forgather, ["broken", *args])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "'broken'" in result.stderr
    assert "no_such_module_for_forgather_tests.cli:group" in result.stderr
    assert "ModuleNotFoundError" in result.stderr
    assert "No module named 'no_such_module_for_forgather_tests'" in result.stderr
    assert "Traceback" not in result.output


def test_entry_point_that_is_not_a_command_becomes_a_placeholder(
    plugins: Any, runner: CliRunner
) -> None:
    result = runner.invoke(forgather, ["notcmd"])
    assert result.exit_code == 1
    assert "not a click command" in result.stderr
    assert f"{__name__}:NOT_A_COMMAND" in result.stderr


def test_first_of_duplicate_entry_points_wins(plugins: Any, runner: CliRunner) -> None:
    assert runner.invoke(forgather, ["good"]).stdout == "good: \n"


def test_no_arguments_shows_help_and_exits_2(plugins: Any, runner: CliRunner) -> None:
    result = runner.invoke(forgather, [])
    assert result.exit_code == 2
    assert "Commands:" in result.output


# --- hand-off to Forgather core ------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["train"],
        ["-t", "config.yaml", "train", "--max-steps", "3"],
        ["-p", "project", "ls", "-r"],
        ["--no-dyn", "meta"],
        ["train", "--help"],
        ["ls", "a b", "", "--", "-x"],
        ["-i"],
    ],
)
def test_core_receives_argv_unchanged(
    plugins: Any, fake_core: dict[str, Any], runner: CliRunner, argv: list[str]
) -> None:
    before = list(sys.argv)
    result = runner.invoke(forgather, argv)
    assert result.exit_code == 0, result.output
    ((argv0, *seen),) = fake_core["calls"]
    assert seen == argv
    assert argv0 == before[0]
    assert sys.argv == before


def test_core_exit_status_is_kept(
    plugins: Any, fake_core: dict[str, Any], runner: CliRunner
) -> None:
    fake_core["result"] = 3
    assert runner.invoke(forgather, ["train"]).exit_code == 3
    fake_core["result"] = None
    fake_core["exit"] = 4
    assert runner.invoke(forgather, ["train"]).exit_code == 4


def test_plugins_and_help_stay_ours_when_core_is_installed(
    plugins: Any, fake_core: dict[str, Any], runner: CliRunner
) -> None:
    assert runner.invoke(forgather, ["good", "x"]).stdout == "good: x\n"
    result = runner.invoke(forgather, ["--help"])
    assert result.exit_code == 0
    assert "Forgather core is installed." in " ".join(result.stdout.split())
    assert fake_core["calls"] == []


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["train", "--max-steps", "3"], "'train' is a Forgather core command"),
        (["-t", "config.yaml", "train"], "'forgather -t config.yaml train' is for Forgather core"),
    ],
)
def test_core_command_without_forgather(
    plugins: Any, no_core: None, runner: CliRunner, argv: list[str], named: str
) -> None:
    result = runner.invoke(forgather, argv)
    assert result.exit_code == CORE_NOT_INSTALLED_EXIT == 1
    assert result.stdout == ""
    assert named in result.stderr
    assert "Forgather is not installed" in result.stderr
    assert "only plugin commands are available: broken, good, lazy, notcmd" in result.stderr
    assert "Traceback" not in result.output


def test_typo_of_a_plugin_gets_a_suggestion(plugins: Any, no_core: None, runner: CliRunner) -> None:
    result = runner.invoke(forgather, ["godo"])
    assert result.exit_code == 1
    assert "Did you mean 'good'?" in result.stderr


def test_core_that_fails_to_import_is_reported(
    plugins: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, runner: CliRunner
) -> None:
    core = tmp_path / "forgather" / "cli"
    core.mkdir(parents=True)
    (tmp_path / "forgather" / "__init__.py").write_text("")
    (core / "__init__.py").write_text("")
    (core / "main.py").write_text("import a_dependency_forgather_lacks\n")
    names = ("forgather", "forgather.cli", "forgather.cli.main")
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        result = runner.invoke(forgather, ["train"])
    finally:
        for name in names:  # the half-imported fake package must not outlive this test
            sys.modules.pop(name, None)
    assert result.exit_code == 1
    assert "installed but forgather.cli.main failed to import" in result.stderr
    assert "a_dependency_forgather_lacks" in result.stderr


def test_host_module_does_not_import_torch() -> None:
    code = "import sys, forgather_checkpoint.host; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the installed console script ----------------------------------------------------------


def console_script() -> Path:
    script = Path(sys.executable).parent / "forgather"
    if not script.exists():
        pytest.skip("the forgather console script is not installed (pip install -e .)")
    return script


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environment.update(env or {})
    return subprocess.run(
        [str(console_script()), *args],
        capture_output=True,
        text=True,
        env=environment,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def test_installed_help_lists_checkpoint() -> None:
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    assert any(line.split()[:1] == ["checkpoint"] for line in result.stdout.splitlines())


def test_installed_core_command_without_forgather() -> None:
    if importlib.util.find_spec("forgather") is not None:
        pytest.skip("Forgather core is installed here")
    result = run_script("train", "--max-steps", "3")
    assert result.returncode == CORE_NOT_INSTALLED_EXIT
    assert result.stdout == ""
    assert "'train' is a Forgather core command" in result.stderr
    assert "Forgather is not installed" in result.stderr


def test_installed_script_hands_argv_to_a_core_on_pythonpath(tmp_path: Path) -> None:
    core = tmp_path / "site" / "forgather" / "cli"
    core.mkdir(parents=True)
    (tmp_path / "site" / "forgather" / "__init__.py").write_text("")
    (core / "__init__.py").write_text("")
    (core / "main.py").write_text(
        textwrap.dedent(
            """
            import json, os, sys

            def main():
                with open(os.environ["FAKE_CORE_RECORD"], "w") as stream:
                    json.dump(sys.argv[1:], stream)
                return 7
            """
        )
    )
    record = tmp_path / "argv.json"
    env = {"PYTHONPATH": str(tmp_path / "site"), "FAKE_CORE_RECORD": str(record)}
    argv = ["-t", "config.yaml", "train", "--lr", "1e-4", "two words", "--help"]
    result = run_script(*argv, env=env)
    assert result.returncode == 7, result.stderr
    assert json.loads(record.read_text()) == argv

    record.unlink()
    ours = run_script("checkpoint", "--help", env=env)
    assert ours.returncode == 0
    assert "Usage: forgather checkpoint" in ours.stdout
    assert not record.exists()


def test_help_does_not_import_torch() -> None:
    """``forgather --help`` loads the checkpoint plugin for its short help, but not torch."""
    console_script()
    code = textwrap.dedent(
        """
        import sys
        from forgather_checkpoint.host import main
        try:
            main(["--help"])
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        print(sorted(name for name in ("torch", "forgather_checkpoint.cli") if name in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.strip().splitlines()[-1]
    if importlib.util.find_spec("forgather_checkpoint.cli") is None:
        pytest.skip("forgather_checkpoint.cli does not exist yet")
    assert "forgather_checkpoint.cli" in loaded, "the plugin was not loaded for its help"
    assert "torch" not in loaded.replace("forgather_checkpoint.cli", "")

    # The same through the installed script, measured by the interpreter itself.
    timed = run_script("--help", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert timed.returncode == 0
    assert any(line.split()[:1] == ["checkpoint"] for line in timed.stdout.splitlines())
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in timed.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "forgather_checkpoint.host" in imported
    assert not {name for name in imported if name == "torch" or name.startswith("torch.")}


# --- core's own `checkpoint` subcommands ---------------------------------------------------


def test_core_checkpoint_subcommand_is_handed_to_core(fake_core: dict[str, Any],
                                                      runner: CliRunner) -> None:
    result = runner.invoke(host.forgather, ["checkpoint", "link", "--output-path", "out"])
    assert result.exit_code == 0, result.output
    ((_argv0, *seen),) = fake_core["calls"]
    assert seen == ["checkpoint", "link", "--output-path", "out"]


def test_core_checkpoint_subcommand_without_forgather(no_core: None, runner: CliRunner) -> None:
    result = runner.invoke(host.forgather, ["checkpoint", "link"])
    assert result.exit_code == 2
    assert "No such command 'link'" in result.output and "install Forgather" in result.output
