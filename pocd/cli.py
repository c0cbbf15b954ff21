"""The `pocd` command line: check, serve, run, site, demo.

Exit codes: 0 success, 1 an operation was refused or failed, 2 invalid input (config, usage).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pocd.settings import check_files

__all__ = ["main"]


def _check(args: argparse.Namespace) -> int:
    problems = check_files(args.files)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 2
    for path in args.files:
        print(f"{path}: ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pocd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate site configs, protocols and driver files")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(func=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
