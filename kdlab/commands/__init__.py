"""The `kdlab` command: each command parses its options, calls one API function (kdlab.api and the
layers' APIs) and prints what it returns. One module per group of commands, each command's parser
beside its handler: `catalog` (models, methods), `runs` (train, distill), `study` (grid, report,
merge, demo), `bench`, `deploy` (export, compress, latency); `options` holds what they share.

User errors print one line on stderr and exit with code 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from kdlab.commands import bench, catalog, deploy, runs, study
from kdlab.commands.options import Parser
from kdlab.errors import UserError

GROUPS = (catalog, runs, study, bench, deploy)  # in the order `kdlab --help` lists them


def build_parser() -> argparse.ArgumentParser:
    """The `kdlab` parser, every command's subparser on it (each sets `handler`, its function)."""
    parser = Parser(prog="kdlab", description="Knowledge distillation for image classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kdlab` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = ["kdlab", *argv]
    try:
        code = args.handler(args)
        sys.stdout.flush()  # so that a reader who left (`| head`) shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader of our output is gone: stop quietly, as Unix tools do (exit 128 + SIGPIPE).
        # Point stdout at /dev/null so that Python's own flush at exit does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UserError as e:
        sys.stderr.write(f"kdlab: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("kdlab: interrupted; run the same command again to resume\n")
        return 130
