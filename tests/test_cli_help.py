"""Every `moedist` subcommand answers --help without running anything (issue 17: `doctor --help` ran the
doctor), and every flag there has help text; a flag that takes a value and is not required says its
default (issue 17, Deliver 6: "every subcommand's --help shows defaults and text for every flag")."""
import re

import pytest

from moedist import cli

LEAVES = [[n] for n in cli.COMMANDS if n not in ("bench", "convert", "data")] + \
         [["convert", a] for a in ("from-hf", "to-hf", "upcycle", "peft")] + [["data", "prepare"]]
# `bench` subcommands: tests/test_bench.py::test_every_bench_subcommand_help_shows_defaults


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as ex:
        rc = cli.main([*argv, "--help"])
        raise SystemExit(rc)
    out, err = capsys.readouterr()
    assert ex.value.code in (0, None) and not err, (argv, err)
    return out


def option_entries(text: str):
    """(flag, takes a value, entry text) for each option in an argparse help text."""
    body = text.split("\noptions:\n", 1)[1] if "\noptions:\n" in text else ""
    entries = re.split(r"\n(?=  -)", "\n" + body)
    for e in entries:
        m = re.match(r"\s*(-[\w-]+(?:, --[\w-]+)?)(\s+(?:[A-Z_][A-Z_0-9.,\[\]]*|\{[^}]*\}))?(.*)", e, re.S)
        if m:
            yield m.group(1).split(", ")[-1], bool(m.group(2)), " ".join(m.group(3).split())


@pytest.mark.parametrize("argv", LEAVES, ids=" ".join)
def test_help_prints_usage_runs_nothing_and_documents_every_flag(argv, capsys):
    out = _help(argv, capsys)
    assert out.startswith(f"usage: moedist {' '.join(argv)}"), out[:200]   # doctor printed its checks instead
    usage = out.split("\n\n", 1)[0]
    missing = []
    for flag, takes_value, text in option_entries(out):
        if flag in ("-h", "--help"):
            continue
        required = re.search(rf"(?<!\[){re.escape(flag)}\b", usage) and not re.search(rf"\[{re.escape(flag)}\b", usage)
        if not text or (takes_value and not required and "default" not in text):
            missing.append(f"{flag}: {text!r}")
    assert not missing, f"moedist {' '.join(argv)} --help: " + "; ".join(missing)


def test_merge_help_says_what_it_takes(capsys):
    """It promised run directories and refused them (tests/test_checkpoint_cli.py::test_merge_refusals
    checks the refusal): the help names the adapter-only checkpoint and `moedist extract`."""
    out = " ".join(_help(["merge"], capsys).split())
    assert "adapter-only moedist checkpoint" in out and "extract them first" in out


@pytest.mark.parametrize("argv", LEAVES, ids=" ".join)
def test_help_says_each_default_once_and_only_where_it_means_something(argv, capsys):
    """No "(default: False)" on a switch, no "(default: None)" on a positional, no default said twice
    (argparse's own defaults formatter did all three in `convert`: moedist.cli_format.DefaultsFormatter)."""
    out = " ".join(_help(argv, capsys).split())
    assert "(default: False)" not in out and "(default: True)" not in out
    body = out.split(" options: ", 1)[0]                     # usage + positionals
    assert "(default: None)" not in body.split(" positional arguments: ", 1)[-1] or "positional" not in body
    for flag, _, text in option_entries(_help(argv, capsys)):
        assert text.count("(default:") <= 1, f"{flag}: {text!r}"
