"""Every option and argument of every `subjectops` command says what it is (`--help`), and the CLI has `--version`."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from subjectops import __version__
from subjectops.cli import app


def walk(command, path: tuple[str, ...] = ()):
    """The command and every subcommand under it (typer's groups have `commands`)."""
    yield path, command
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from walk(sub, path + (name,))


def test_every_option_and_argument_has_help():
    root = typer.main.get_command(app)
    missing, count = [], 0
    for path, command in walk(root):
        if not path:
            continue
        assert (command.help or command.short_help or "").strip(), f"`subjectops {' '.join(path)}` has no help"
        for param in command.params:
            if param.name == "help":
                continue
            count += 1
            if not (getattr(param, "help", None) or "").strip():
                missing.append(f"subjectops {' '.join(path)} {param.opts[0] if param.opts else param.name}")
    assert count > 100  # the walk reached the commands' options
    assert not missing, "options and arguments without help:\n" + "\n".join(missing)


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"subjectops {__version__}"


def test_a_method_key_spelled_like_the_method_names_the_right_key():
    """`--method textual-inversion` but `finetune.textual_inversion`: the other spelling is refused, naming the key."""
    import pytest

    from subjectops.config import ConfigError, load_params

    with pytest.raises(ConfigError, match=r"did you mean finetune\.textual_inversion\?") as err:
        load_params(None, ["finetune.textual-inversion.steps=5"])
    assert "--set finetune.textual_inversion.steps" in err.value.message
    with pytest.raises(ConfigError, match=r"did you mean 'textual-inversion'\?"):
        load_params(None, ["finetune.method=textual_inversion"])
    with pytest.raises(ConfigError, match=r"did you mean finetune\.lora\.rank\?"):
        load_params(None, ["finetune.lora.rnak=4"])
    result = CliRunner().invoke(app, ["models", "check", "--set", "finetune.two-stage.unet_steps=3"])
    assert result.exit_code == 2 and "finetune.two_stage" in result.output


def test_run_folder_is_taken_the_same_way_and_two_different_ones_are_refused(tmp_path):
    root = typer.main.get_command(app)
    for name in ("refine", "priors", "pretrain-disc", "finetune", "infer", "sweep", "evaluate", "choose", "register",
                 "sync"):
        assert any("--run" in p.opts for p in root.commands[name].params), name
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "a"), "--run", str(tmp_path / "b"),
                                      "--model", "tiny-sd15"])
    assert result.exit_code == 2 and "two run folders given" in result.output
    result = CliRunner().invoke(app, ["sync"])
    assert result.exit_code == 2 and "no run folder given" in result.output and "--run" in result.output


def test_run_takes_a_tracking_uri():
    root = typer.main.get_command(app)
    assert any("--tracking-uri" in p.opts for p in root.commands["run"].params)
