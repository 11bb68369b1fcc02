"""The ``deltakit`` command line: thin - it parses, builds objects and calls the library.

Errors print one line and exit 1; ``--debug`` (anywhere on the line) shows the traceback.
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def _version_line() -> str:
    """``deltakit 0.1.0 (torch 2.13.0, transformers 5.23.0, Python 3.11.9)``, read without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    from .._version import __version__

    parts = []
    for dist in ("torch", "transformers"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} missing")
    return f"deltakit {__version__} ({', '.join(parts)}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    parser = argparse.ArgumentParser(
        prog="deltakit",
        description="Train, inspect, evaluate, export, merge and benchmark parameter-efficient deltas.")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks on error (accepted anywhere on the command line)")
    parser.add_argument("--version", action="version", version=_version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in commands.REGISTER:
        register(sub)
    return parser


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Take ``--debug`` out wherever it stands (before ``--``), so ``deltakit merge r.yaml --debug``
    works as ``deltakit --debug merge r.yaml`` does."""
    cut = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:cut] if a != "--debug"] + argv[cut:]
    return kept, len(kept) != len(argv)


def main(argv: list[str] | None = None) -> int:
    argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = debug or args.debug
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("deltakit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line unless --debug
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"deltakit {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
