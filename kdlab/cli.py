"""The `kdlab` console script's entry point (`python -m kdlab.cli` too): the commands are in kdlab/commands/."""

from __future__ import annotations

from kdlab.commands import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
