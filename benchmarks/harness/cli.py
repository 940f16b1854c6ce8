"""`python -m benchmarks`: flags to suite, run, tables on stdout, README regenerated."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence

from hf_replacement.commands.argtypes import positive_int

from .. import __doc__ as PACKAGE_DOC
from .errors import BenchmarkError
from .methods import METHODS
from .readme import write_readme
from .report import render_table
from .runner import run_benchmark, train_one_seed
from .suites import SUITES, SuiteSpec, get_suite

PROGRAM = "python -m benchmarks"
# Not a SuiteSpec: step ratios and bandwidth only, no training (benchmarks/speed.py).
SPEED_SUITE = "speed"


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags (`--readme` aside)."""
    parser.add_argument("--suite", choices=[*SUITES, SPEED_SUITE], default="quick",
                        help="; ".join(f"{name}: {suite.summary}" for name, suite in SUITES.items())
                        + f"; {SPEED_SUITE}: RepL step time against its limit and synthesis bandwidth, its own flags "
                        f"(`{PROGRAM} --suite {SPEED_SUITE} --help`): about 12 min on 2 CPU cores")
    parser.add_argument("--seeds", type=positive_int, default=None, help="seeds per trained method (default 3)")
    parser.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default: the suite's)")
    parser.add_argument("--output-dir", default=None,
                        help="where results.json, results.md and the plots go (default benchmarks/<suite>)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"subset of {', '.join(METHODS)} (space or comma separated)")
    parser.add_argument("--models", nargs="+", default=None, help="subset of presets (default: the suite's)")
    parser.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST IDX files")
    parser.add_argument("--max-train-samples", type=positive_int, default=None, help="subsample the training set")
    parser.add_argument("--batch-size", type=positive_int, default=None)
    parser.add_argument("--pretrain-epochs", type=positive_int, default=None,
                        help="transfer suite: pretraining epochs (default: the suite's)")
    parser.add_argument("--pretrain-max-train-samples", type=positive_int, default=None,
                        help="transfer suite: subsample the pretraining set")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--only-seed", type=int, default=None, metavar="SEED",
                        help="train only this seed's runs into runs/ and write nothing else, so that processes "
                        "given different seeds share a machine; then run without it to collect the results")


def suite_from_args(args: argparse.Namespace) -> SuiteSpec:
    """The suite the flags pick, with the flags given applied (checked)."""
    models = [name for raw in args.models for name in raw.split(",") if name] if args.models else None
    return get_suite(
        args.suite,
        seeds=args.seeds,
        epochs=args.epochs,
        methods=args.methods,
        models=models,
        max_train_samples=args.max_train_samples,
        batch_size=args.batch_size,
        pretrain_epochs=args.pretrain_epochs,
        pretrain_max_train_samples=args.pretrain_max_train_samples,
    )


def run_benchmark_from_args(args: argparse.Namespace, program: str = PROGRAM) -> int:
    """Run the benchmark the flags describe, print the Markdown tables, rewrite benchmarks/README.md (with
    `--only-seed`: train that seed's runs only).

    Returns 0 on success, 2 on a usage error. `program` heads the command line recorded in the results.
    """
    command = " ".join([program, *(shlex.quote(a) for a in sys.argv[1:])])
    try:
        suite = suite_from_args(args)
        if args.only_seed is not None:
            train_one_seed(suite, args.only_seed, args.output_dir, data_dir=args.data_dir, device=args.device)
            return 0
        results = run_benchmark(suite, args.output_dir, data_dir=args.data_dir, device=args.device, command=command)
    except BenchmarkError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return 2
    write_readme()
    # The command's output: the tables, as in results.md.
    print("\n\n".join(render_table(name, model, results["suite"]) for name, model in results["models"].items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m benchmarks`: run a suite, or with `--readme` only regenerate benchmarks/README.md."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--suite")
    suite, rest = peek.parse_known_args(arguments)
    if suite.suite == SPEED_SUITE:  # its own flags and table (benchmarks/speed.py)
        from ..speed import main as speed_main

        return speed_main(rest, program=f"{PROGRAM} --suite {SPEED_SUITE}")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = argparse.ArgumentParser(prog=PROGRAM, description=PACKAGE_DOC.split("\n\n")[0])
    add_benchmark_arguments(parser)
    parser.add_argument("--readme", action="store_true",
                        help="only rewrite benchmarks/README.md from the results on disk (no training)")
    args = parser.parse_args(argv)
    if args.readme:
        print(f"wrote {write_readme()}")
        return 0
    return run_benchmark_from_args(args, program=parser.prog)
