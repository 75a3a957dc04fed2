import subprocess
import sys

import pytest

from braintumor.serving.cli import build_parser, main

SUBCOMMANDS = ["audit-data", "prepare-data", "train", "evaluate", "calibrate", "fit-ood", "model-card", "cam-study",
               "export"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_option_has_help(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"{command} {action.option_strings or action.dest} has no help"


def test_console_script_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "braintumor.serving.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in SUBCOMMANDS:
        assert command in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["audit-data", "/nonexistent/brisc", "--out", "/tmp/x"], "dataset folder not found"),
        (["train", "--data", "/nonexistent/brisc", "--out", "RUN"], "dataset folder not found"),
        (["evaluate", "--checkpoint", "/nonexistent/best.pt", "--data", ".", "--out", "/tmp/x"], "checkpoint not found"),
    ],
)
def test_bad_input_is_one_clear_line(argv, fragment, capsys, tmp_path):
    argv = [a.replace("RUN", str(tmp_path / "run")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_train_rejects_bad_config_value(capsys, tmp_path, synthetic_root):
    assert main(["train", "--data", str(synthetic_root), "--out", str(tmp_path / "r"), "--epochs", "0"]) == 2
    assert "epochs" in capsys.readouterr().err


def _commands(parser) -> set[str]:
    return set(parser._subparsers._group_actions[0].choices)


def test_loadtest_is_offered_only_where_its_layer_is_installed(monkeypatch):
    assert "loadtest" in _commands(build_parser())
    monkeypatch.setitem(sys.modules, "braintumor.loadtest", None)  # as in the gateway image: the layer is absent
    monkeypatch.delitem(sys.modules, "braintumor.loadtest.commands", raising=False)
    commands = _commands(build_parser())
    assert "loadtest" not in commands and {"serve", "score"} <= commands


def test_a_broken_import_inside_an_optional_layer_is_not_hidden(monkeypatch):
    monkeypatch.delitem(sys.modules, "braintumor.loadtest.commands", raising=False)
    monkeypatch.setitem(sys.modules, "braintumor.loadtest.memory", None)  # installed, but one of its modules fails
    with pytest.raises(ModuleNotFoundError):
        build_parser()


def test_prepare_data_on_a_missing_split_names_it_and_the_flag(synthetic_root, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(["prepare-data", str(synthetic_root), "--out", str(out), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "'test' split" in err and "splits found: train" in err and "--split" in err
    assert not out.exists() or not any(out.iterdir())  # no empty cache left behind


def test_every_help_says_each_default_once(capsys):
    """No "(config default 128) (default: None)": a default is appended only when there is one to say and the help
    does not say it already; every command has a description or a help line."""
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        text = sub.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
        for action in sub._actions:
            if action.help and "default" in action.help:
                assert action.help.count("default") == sub.formatter_class(name)._get_help_string(action).count(
                    "default"), (name, action.dest)
    serve = parser._subparsers._group_actions[0].choices["serve"].format_help()
    assert "(default: 50052)" in serve  # a plain default is still shown
