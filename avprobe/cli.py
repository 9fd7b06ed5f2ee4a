"""avprobe command line: collect | organism | dataset | judge | report | release-check | bench | calibrate | inputs.

Each area owns its subcommand in `avprobe/<area>/cli.py` (a `register(subparsers)` function
that adds a parser whose `func` takes the parsed args and returns an exit code), so the CLI
imports only the area being run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> module defining register(subparsers)
_AREAS = {
    "collect": "avprobe.pipeline.cli",
    "organism": "avprobe.lab.cli",
    "dataset": "avprobe.media.cli",
    "judge": "avprobe.judge.cli",
    "report": "avprobe.report.cli",
    "release-check": "avprobe.report.release",
    "bench": "avprobe.bench.cli",
    "calibrate": "avprobe.calibrate_cli",
    "inputs": "avprobe.adapters.cli",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avprobe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    from avprobe import __version__

    parser.add_argument("--version", action="version", version=f"avprobe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _AREAS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(see avprobe {name} --help)")
            continue
        importlib.import_module(module).register(sub)  # a missing area module is a bug: let it raise
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = next((a for a in argv if a in _AREAS), None)
    args = build_parser(only).parse_args(argv)
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
    )
    if not getattr(args, "func", None):
        build_parser(only).print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
