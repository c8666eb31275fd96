"""One flag vocabulary: every command's --help shows the dashed names only, and the old spellings still parse
into the same parameters (hidden aliases from `titans_distil.flags.OLD_SPELLINGS`)."""

import argparse
import re
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from titans_distil.commands import main
from titans_distil.flags import OLD_SPELLINGS, AliasedOption, add_argument

ROOT = Path(__file__).resolve().parents[1]
OLD = sorted({old for olds in OLD_SPELLINGS.values() for old in olds})


def commands(group: click.Group, prefix=()):
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from commands(command, (*prefix, name))


ALL = list(commands(main))


def shows(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=" ".join)
def test_help_shows_only_the_new_spellings(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert [flag for flag in OLD if shows(result.output, flag)] == []


def test_every_option_is_dashed_and_every_old_spelling_is_hidden():
    for path, command in ALL:
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            hidden = param.aliases if isinstance(param, AliasedOption) else ()
            shown = [name for name in param.opts + param.secondary_opts if name not in hidden]
            assert all("_" not in name for name in shown), (path, shown)
            assert not set(shown) & set(OLD), (path, shown)  # an old name only ever as a hidden alias
            for new, olds in OLD_SPELLINGS.items():
                if new in shown:
                    assert set(olds) <= set(hidden), (path, new)


def parsed(path, args):
    command = main
    for name in path:
        command = command.commands[name]
    return command.make_context(" ".join(path), [str(a) for a in args]).params


@pytest.mark.parametrize(
    "path, old",
    [
        (("generate",), ["--model_path", "m", "--use_mac", "--max-tokens", "7"]),
        (("vllm",), ["--model_path", "m", "--use_mac", "--max-tokens", "7"]),
        (("quantize",), ["--model_path", "m", "--bits", "8", "--output", "o", "--new-tokens", "7"]),
        (("recall",), ["--model_path", "m", "--max_new_tokens", "7"]),
        (("package",), ["--model", "m", "--output", "o"]),
        (("distil",), ["--use_mac"]),
        (("inspect", "verify"), ["e", "--run", "r", "--new-tokens", "7"]),
    ],
    ids=lambda v: " ".join(v),
)
def test_old_spellings_map_to_the_same_parameter(path, old):
    renamed = {
        "--model_path": "--model-path",
        "--model": "--model-path",
        "--use_mac": "--use-mac",
        "--max-tokens": "--max-new-tokens",
        "--new-tokens": "--max-new-tokens",
        "--max_new_tokens": "--max-new-tokens",
    }
    new_args = [renamed.get(a, a) for a in old]
    assert new_args != old
    assert parsed(path, old) == parsed(path, new_args)


def test_errors_name_the_new_spelling_even_when_the_old_one_was_typed():
    result = CliRunner().invoke(main, ["generate", "--model_path", "m", "--max-tokens", "zero"])
    assert result.exit_code == 2
    assert "'--max-new-tokens'" in result.output and "--max-tokens" not in result.output
    result = CliRunner().invoke(main, ["generate"])
    assert "Missing option '--model-path'" in result.output and "model_path" not in result.output


def test_argparse_benchmarks_take_the_old_spellings_hidden():
    parser = argparse.ArgumentParser()
    add_argument(parser, "--max-new-tokens", type=int, default=5, help="tokens")
    add_argument(parser, "--model-path", default="x")
    assert parser.parse_args([]).max_new_tokens == 5
    assert parser.parse_args(["--new-tokens", "3"]).max_new_tokens == 3
    assert parser.parse_args(["--max-tokens", "4", "--model", "m"]).model_path == "m"
    text = parser.format_help()
    assert [flag for flag in OLD if shows(text, flag)] == []

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_serving
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    args = bench_serving.parse_args(["--model", "exports/x", "--new-tokens", "9"])
    assert (args.model_path, args.max_new_tokens) == ("exports/x", 9)
