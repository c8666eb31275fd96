"""One flag vocabulary for every command line of the project (root scripts, `titans-distil`, benchmarks).

Flags are spelled with dashes, one name per concept: `--model-path` (a model folder or Hub id),
`--max-new-tokens` (tokens to generate), `--dtype` (the dtype weights are loaded in; `--precision` is a
different thing, the mixed precision of training or of a teacher's forward), `--use-mac`. Spellings from
before this vocabulary keep working as hidden aliases: `OLD_SPELLINGS` is the one table of them, `option()`
(click) and `add_argument()` (argparse, the benchmarks) the only ways the commands declare a flag that has
one. `--help` shows the new name only; an old name parses into the same parameter.
"""

from __future__ import annotations

import argparse

import click

# new name -> the spellings it replaces (still accepted, never shown)
OLD_SPELLINGS: dict[str, tuple[str, ...]] = {
    "--model-path": ("--model_path", "--model"),
    "--max-new-tokens": ("--max-tokens", "--new-tokens", "--max_new_tokens"),
    "--use-mac": ("--use_mac",),
}


class AliasedOption(click.Option):
    """A click option that also answers to `aliases`, which `--help` and error messages never show."""

    def __init__(self, param_decls, *, aliases: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__([*param_decls, *aliases], **kwargs)
        self.aliases = tuple(aliases)

    def _shown(self, names: list[str]) -> list[str]:
        return [name for name in names if name not in self.aliases]

    def get_help_record(self, ctx):
        opts, secondary = self.opts, self.secondary_opts
        self.opts, self.secondary_opts = self._shown(opts), self._shown(secondary)
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts, self.secondary_opts = opts, secondary

    def get_error_hint(self, ctx) -> str:
        return " / ".join(f"'{name}'" for name in self._shown(self.opts))


def aliases_of(*names: str) -> tuple[str, ...]:
    """The old spellings of the flags among `names` (a declaration such as ("--model-path", "model_path"))."""
    return tuple(old for name in names for old in OLD_SPELLINGS.get(name, ()))


def option(*param_decls: str, aliases: tuple[str, ...] | None = None, **kwargs):
    """`click.option` whose old spellings (from `OLD_SPELLINGS`, or `aliases`) are accepted but hidden."""
    hidden = aliases_of(*param_decls) if aliases is None else tuple(aliases)
    return click.option(*param_decls, cls=AliasedOption, aliases=hidden, **kwargs)


def add_argument(parser: argparse.ArgumentParser, name: str, **kwargs) -> argparse.Action:
    """`parser.add_argument(name, ...)` for the argparse benchmarks, with the old spellings of `name` accepted
    into the same destination and left out of `--help`."""
    action = parser.add_argument(name, **kwargs)
    old = aliases_of(name)
    if old:
        hidden = {k: v for k, v in kwargs.items() if k not in ("help", "default", "required")}
        parser.add_argument(
            *old, dest=action.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **hidden
        )
    return action
