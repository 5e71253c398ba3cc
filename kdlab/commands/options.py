"""What the commands share: the parser class, the run options, KEY=VALUE pairs, torchrun launching."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from kdlab.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but its usage errors are one line too (and still exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"kdlab: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by train, distill and grid: where data and runs are, and the recipe."""
    p.add_argument("--dataset", help="cifar10, cifar100, synthetic, a folder with train/<class>/ and test/<class>/ "
                   "(or val/<class>/), or hf:PATH_OR_NAME (a Hugging Face dataset; kdlab[hf])")
    p.add_argument("--data-dir", help="where datasets live (default $KDLAB_DATA_DIR or ~/.cache/kdlab/data)")
    p.add_argument("--cache-dir", help="where datasets are decoded to, once (default $KDLAB_CACHE_DIR or "
                   "~/.cache/kdlab/decoded)")
    p.add_argument("--preset", default="paper", help="paper (the paper's recipe), fast (GPU), smoke (seconds, CPU), "
                   "imagenet (the ImageNet KD benchmark's recipe)")
    p.add_argument("--config", help="YAML file of settings; command-line options override it")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting, e.g. --set weight_decay=1e-4 --set compile=none (repeatable)")
    p.add_argument("--runs-dir", help="runs database and checkpoints (default $KDLAB_RUNS_DIR or ./runs)")
    p.add_argument("--quiet", action="store_true", help="one line per epoch, no live progress bar")
    p.add_argument("--mlflow", metavar="URI", help="also log to MLflow: a tracking server or a local folder "
                   "(needs kdlab[mlflow]); TensorBoard files go to RUNS_DIR/tb/ when tensorboard is installed")


def add_nproc(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1,
                   help="train this one run on N local GPUs (DistributedDataParallel, started through torchrun)")


def distributed_launch(args: argparse.Namespace) -> int | None:
    """`--nproc N`: run this same command under torchrun on N processes (None: train here)."""
    from kdlab import distributed

    if args.nproc == 1 or distributed.current() is not None:
        return None
    return distributed.launch(args.nproc, without_option(args.argv[1:], "--nproc"))


def quiet_rank() -> bool:
    """In a run on several processes only rank 0 prints the result."""
    from kdlab import distributed

    world = distributed.current()
    return world is not None and not world.main


def pairs(items: Sequence[str], flag: str, form: str = "KEY=VALUE") -> dict[str, Any]:
    """KEY=VALUE options (repeatable) as a dict, each value parsed as YAML (3 -> int, [1, 2] -> list)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} takes {form}, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def settings(items: Sequence[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs as Config fields (dashes in keys read as underscores)."""
    return {k.replace("-", "_"): v for k, v in pairs(items, "--set").items()}


def overrides(args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    """Config overrides from the named options and --set KEY=VALUE pairs."""
    out = {"dataset": args.dataset, "data_dir": args.data_dir, "cache_dir": args.cache_dir, "epochs": args.epochs,
           "seed": args.seed,
           "batch_size": args.batch_size, "lr": args.lr, "device": args.device, "mlflow": args.mlflow, **extra}
    out.update(settings(args.set))
    return out


def csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def without_option(argv: list[str], flag: str) -> list[str]:
    """`argv` without `flag VALUE` / `flag=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out
