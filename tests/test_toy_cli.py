import argparse

import pytest

from attnmod.toy import cli


def test_register_adds_both_subcommands():
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-toy", "--steps", "5", "--workdir", "w"])
    assert args.steps == 5 and args.workdir == "w" and args.func is cli._train
    args = parser.parse_args(["eval-toy", "--n", "3", "--sweep", "1", "2"])
    assert args.n == 3 and args.sweep == [1.0, 2.0] and args.func is cli._eval


def test_main_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train-toy", "--help"])
    assert e.value.code == 0 and "resume" in capsys.readouterr().out.lower()
