"""The ``dsv4`` command. Each subcommand lives next to the code it drives and registers itself here
through a ``register(subparsers)`` function that sets ``func`` on its parser; this file only lists them."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand modules, in the order `dsv4 --help` lists them
COMMAND_MODULES = [
    "dsv4.commands.info",
    "dsv4.commands.check_vectors",
    "dsv4.chat.commands",
    "dsv4.engine.commands",
    "dsv4.server.commands",
    "dsv4.costs",
    "dsv4.train.commands",
]


class CLIError(Exception):
    """A user-facing error: printed as ``dsv4: error: ...`` with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # not written yet on this branch
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"dsv4: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"dsv4: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
