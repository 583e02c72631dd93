"""The command registry: every `moedist COMMAND` points at a function that exists.

A misspelt module or function in ``moedist.cli.COMMANDS`` must fail here (and at run time with a
traceback naming it), never degrade into a quiet "not available yet".
"""
import importlib

import pytest

from moedist import cli


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_registered_command_resolves_to_a_function(name):
    fn = cli._resolve(name)
    assert callable(fn)
    module_name, _, func_name = cli.COMMANDS[name].target.partition(":")
    assert fn is getattr(importlib.import_module(module_name), func_name)


def test_a_misspelt_target_is_an_error_not_a_missing_feature(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "train", cli.Command("moedist.train.run:main_trian", "x", True))
    with pytest.raises(AttributeError, match="main_trian"):
        cli._resolve("train")
    monkeypatch.setitem(cli.COMMANDS, "train", cli.Command("moedist.trian.run:main_train", "x", True))
    with pytest.raises(ModuleNotFoundError, match="moedist.trian"):
        cli._resolve("train")
