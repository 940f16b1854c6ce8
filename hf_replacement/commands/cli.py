"""`hf-replacement` command line: train, evaluate, merge.

Run it as the console script, as `python -m hf_replacement.commands.cli`, or under
`accelerate launch -m hf_replacement.commands.cli train ...` for several processes or nodes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence

from ..config import ReplacementConfig
from ..hub import HubError
from .argtypes import block_list, chain_names, coefficient_init, non_negative_float, positive_float, positive_int
from .save_guard import SaveError, SaveInterrupted, what_is_intact
from .training_steps import DivergenceError, NonFiniteLossError


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        default="digits",
        help="digits (embedded), fashion-mnist, a Hub id, or a local imagefolder / save_to_disk dir",
    )
    parser.add_argument(
        "--data-dir", help="directory with the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)"
    )
    parser.add_argument(
        "--max-eval-samples", type=positive_int, help="evaluate on a random subset of the test split (seeded)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="per process (global batch: x processes x accumulation)"
    )
    parser.add_argument("--seed", type=int, default=0, help="initialisation, data order and the digits split")


# Which blocks to replace: one way at a time (or --baseline, none).
_SELECTION_FIELDS = ("replace_interval", "replaced_blocks")
_VALUE_PARSERS = {
    "replaced_blocks": block_list,
    "coefficient_init": coefficient_init,
    "target_chains": chain_names,
}


def _replacement_fields() -> list[dataclasses.Field]:
    return [spec for spec in dataclasses.fields(ReplacementConfig) if spec.metadata.get("cli")]


_GIVEN = "_given_replacement_flags"


def _recording(action: type[argparse.Action]) -> type[argparse.Action]:
    """`action` that also notes its flag as given: argparse's own exclusivity check cannot see a value
    equal to the default (`--replace-interval 4`), and `--baseline` must refuse any RepL flag given."""

    class Recording(action):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            getattr(namespace, _GIVEN).append(option_string)

    return Recording


def _add_replacement_arguments(parser: argparse.ArgumentParser, selection: argparse._MutuallyExclusiveGroup) -> None:
    """One flag per `ReplacementConfig` field marked for the CLI: help, choices and defaults come from the config."""
    parser.set_defaults(**{_GIVEN: []})
    for spec in _replacement_fields():
        target = selection if spec.name in _SELECTION_FIELDS else parser
        flag = "--" + spec.name.replace("_", "-")
        if isinstance(spec.default, bool):
            target.add_argument(
                flag, action=_recording(argparse._StoreTrueAction), dest=spec.name, help=spec.metadata["help"]
            )
            continue
        target.add_argument(
            flag,
            action=_recording(argparse._StoreAction),
            dest=spec.name,
            default=spec.default,
            type=_VALUE_PARSERS.get(spec.name, type(spec.default) if spec.default is not None else str),
            choices=spec.metadata.get("choices"),
            help=f"{spec.metadata['help']} (default: {spec.default})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-replacement", description="Replacement Learning (RepL) for Transformers vision models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model with RepL (or --baseline) and evaluate it")
    train.add_argument(
        "--model",
        default="vit-mini",
        help="preset (vit-mini, vit-tiny, deit-small, convnext-tiny, ...), Hub id or local model dir",
    )
    _add_data_arguments(train)
    train.add_argument(
        "--image-size", type=positive_int, help="input resolution (default: the data's, or the pretrained model's)"
    )
    train.add_argument("--max-train-samples", type=positive_int, help="train on a random subset (seeded)")
    selection = train.add_mutually_exclusive_group()
    _add_replacement_arguments(train, selection)
    selection.add_argument("--baseline", action="store_true", help="ordinary training, everything else the same")
    train.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        default="no",
        help="autocast; coefficients and master weights stay fp32",
    )
    train.add_argument(
        "--fsdp",
        action="store_true",
        help="shard parameters, gradients and optimizer state with FSDP2 across the processes of a torchrun / "
        "accelerate launch (each replaced block with its neighbours in one unit); with --mixed-precision bf16, "
        "FSDP's bf16 compute with fp32 master weights",
    )
    train.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    train.add_argument("--epochs", type=positive_float, default=10, help="may be fractional")
    train.add_argument("--lr", type=positive_float, default=1e-3)
    train.add_argument("--weight-decay", type=non_negative_float, default=0.05)
    train.add_argument("--output-dir", default="outputs/repl", help="model, results.json and checkpoint-N/ go here")
    train.add_argument("--resume-from", help="a checkpoint-<step> directory written with --checkpointing-steps")
    train.add_argument("--checkpointing-steps", type=positive_int, help="write checkpoint-N/ every N updates")
    train.add_argument(
        "--stop-on-divergence",
        action="store_true",
        help="stop (exit 1) when the mean loss of 20 updates exceeds 3x the first update's; without it, a warning",
    )
    train.add_argument("--report-to", nargs="*", default=[], help="trackers for Accelerate: tensorboard, wandb, ...")
    train.add_argument("--push-to-hub", action="store_true", help="push the model, results and a model card at the end")
    train.add_argument("--hub-model-id", help="user/name (default: the output directory's name)")
    train.add_argument("--hub-token", help="default: the token of `hf auth login` or HF_TOKEN")

    evaluate = commands.add_parser(
        "evaluate", help="accuracy of a saved RepL or merged image classifier (other tasks: see docs/cli.md)"
    )
    evaluate.add_argument("checkpoint", help="directory written by train / save_pretrained / merge")
    _add_data_arguments(evaluate)

    merge = commands.add_parser(
        "merge", help="write a RepL checkpoint as a plain Transformers model, with its tokenizer / processor files"
    )
    merge.add_argument("checkpoint")
    merge.add_argument("output_dir")
    return parser


def _check_replacement_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The RepL flags given must mean something: one selection flag, and none at all with --baseline."""
    given = list(dict.fromkeys(getattr(args, _GIVEN, [])))
    selection = [flag for flag in given if flag.lstrip("-").replace("-", "_") in _SELECTION_FIELDS]
    if len(selection) > 1:
        parser.error(f"argument {selection[1]}: not allowed with argument {selection[0]} (give one of the two)")
    if args.baseline and given:
        parser.error(
            f"argument --baseline: not allowed with {', '.join(given)}: --baseline trains the unchanged model, so "
            "these RepL flags would be ignored. Drop them, or drop --baseline."
        )


def _train(args: argparse.Namespace) -> int:
    from .train import TrainingOptions, train

    values = {key: value for key, value in vars(args).items() if key not in ("command", _GIVEN)}
    replacement = ReplacementConfig(**{spec.name: values.pop(spec.name) for spec in _replacement_fields()})
    options = TrainingOptions(replacement=replacement, **values)
    results = train(options)
    from accelerate import PartialState

    if PartialState().is_main_process:
        _report(results, options.output_dir)
    return 0


def _report(results: dict, output_dir: str) -> None:
    trainable, unreplaced = results["trainable_params"], results["total_params_unreplaced"]
    if results.get("replaced_blocks"):
        savings = f"(the model without RepL trains {unreplaced:,d}: {100 * (1 - trainable / unreplaced):.1f}% fewer)"
        blocks = ", ".join(f"{index} ({name})" for index, name in results["replaced_blocks"].items())
        lines = [f"trainable params: {trainable:,d} {savings}", f"replaced blocks: {blocks}"]
        if results.get("coefficient_fit"):
            from ..reporting import describe_fit_errors

            fits = describe_fit_errors(results["coefficient_fit"])
            lines.append(f"fitted initial coefficients, relative reconstruction error: {fits}")
    else:
        lines = [f"trainable params: {trainable:,d} (ordinary training)"]
    if results["median_step_seconds"] is None:  # resumed from a checkpoint at (or past) the last update
        timing = f"no update taken: the run had already reached its {results['updates']} updates"
    else:
        timing = f"median step: {results['median_step_seconds']:.4f} s"
    lines += [
        f"{timing}; peak memory: {results['peak_memory_mb']:.0f} MB",
        f"saved: {output_dir} (model, image processor, results.json)",
        f"accuracy: {results['accuracy']:.4f}",
    ]
    if results.get("divergence"):
        lines.append(f"warning: {results['divergence']}")
    print("\n".join(lines))


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint, args.dataset, args.data_dir, args.batch_size, args.max_eval_samples, args.seed
    )
    print(json.dumps(result, indent=2))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .merge import merge_checkpoint

    result = merge_checkpoint(args.checkpoint, args.output_dir)
    how = result.task.how_to_load(args.output_dir) if result.task else "its config names no Transformers class"
    carried = ", ".join(result.processing_files) or "none (pass a processor to the pipeline yourself)"
    print(f"merged model written to {args.output_dir} ({how})\nprocessing files carried over: {carried}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        _check_replacement_flags(parser, args)
    handlers = {"train": _train, "evaluate": _evaluate, "merge": _merge}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, NonFiniteLossError, HubError) as error:
        parser.exit(2, f"hf-replacement {args.command}: error: {error}\n")
    except (SaveError, DivergenceError) as error:  # the disk's or the run's fault, not the command line's
        parser.exit(1, f"hf-replacement {args.command}: error: {error}\n")
    except KeyboardInterrupt as interrupt:
        parser.exit(130, f"hf-replacement {args.command}: {_interrupted(args, interrupt)}\n")


def _interrupted(args: argparse.Namespace, interrupt: KeyboardInterrupt) -> str:
    if isinstance(interrupt, SaveInterrupted):
        return str(interrupt)
    if args.command == "train":
        return f"interrupted (Ctrl-C); {what_is_intact(args.output_dir)}."
    return "interrupted (Ctrl-C); nothing was written." if args.command == "merge" else "interrupted (Ctrl-C)."


if __name__ == "__main__":
    sys.exit(main())
