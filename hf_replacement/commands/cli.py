"""`hf-replacement` command line: train, evaluate, merge.

Run it as the console script, as `python -m hf_replacement.commands.cli`, or under
`accelerate launch -m hf_replacement.commands.cli train ...` for several processes or nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import sys
from collections.abc import Iterator, Sequence

from ..config import ReplacementConfig
from .argtypes import (
    block_list,
    chain_names,
    coefficient_init,
    fraction,
    non_negative_float,
    positive_float,
    positive_int,
)

# Parsing imports no torch, Transformers or Accelerate (`hf-replacement --help` answers at once): the package's
# names load lazily, and each command imports what it runs inside its handler.


class _HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, written as one would type it (`0.5,0.5`, not `(0.5, 0.5)`).

    A flag without a value (`store_true`) is off unless given; a flag whose default is None says in its
    own help what happens without it, since "None" would tell the reader nothing.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if "default" in help_text or default is None or default is False or default is argparse.SUPPRESS:
            return help_text
        if isinstance(default, (list, tuple)):
            shown = ",".join(str(value) for value in default) if default else "none"
        else:
            shown = str(default)
        return f"{help_text} (default: {shown.replace('%', '%%')})"


def _add_data_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--dataset",
        default="digits",
        help="digits (embedded), fashion-mnist, a Hub id, or a local imagefolder / save_to_disk dir",
    )
    group.add_argument(
        "--data-dir",
        metavar="DIR",
        help="directory with the Fashion-MNIST IDX files (default: /usr/share/datasets/fashion-mnist)",
    )
    group.add_argument(
        "--max-eval-samples",
        type=positive_int,
        metavar="N",
        help="evaluate on a random subset of N test images, seeded (default: the whole test split)",
    )
    group.add_argument(
        "--batch-size",
        type=positive_int,
        default=64,
        metavar="N",
        help="images per process and step (global batch: x processes x accumulation steps)",
    )
    group.add_argument("--seed", type=int, default=0, help="initialisation, data order and the digits split")


# Which blocks to replace: one way at a time (or --baseline, none).
_SELECTION_FIELDS = ("replace_interval", "replaced_blocks")
_VALUE_PARSERS = {
    "replaced_blocks": block_list,
    "coefficient_init": coefficient_init,
    "target_chains": chain_names,
}
_METAVARS = {
    "replace_interval": "K",
    "replaced_blocks": "I,J,...",
    "coefficient_init": "A,B|fit",
    "target_chains": "NAME,...",
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


def _add_replacement_arguments(group: argparse._ArgumentGroup) -> None:
    """One flag per `ReplacementConfig` field marked for the CLI: help, choices and defaults come from the config."""
    group.set_defaults(**{_GIVEN: []})
    selection = group.add_mutually_exclusive_group()
    for spec in _replacement_fields():
        target = selection if spec.name in _SELECTION_FIELDS else group
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
            metavar=_METAVARS.get(spec.name),
            help=spec.metadata["help"],
        )
    selection.add_argument(
        "--baseline", action="store_true", help="ordinary training (no block replaced), everything else the same"
    )


def _add_training_arguments(train: argparse.ArgumentParser) -> None:
    optimisation = train.add_argument_group("optimisation")
    optimisation.add_argument(
        "--epochs", type=positive_float, default=10, help="passes over the data; may be fractional"
    )
    optimisation.add_argument(
        "--lr", type=positive_float, default=1e-3, help="peak learning rate of AdamW (cosine decay after the warm-up)"
    )
    optimisation.add_argument(
        "--weight-decay",
        type=non_negative_float,
        default=0.05,
        help="AdamW's decoupled weight decay, on every trainable parameter (the coefficients included)",
    )
    optimisation.add_argument(
        "--warmup-ratio",
        type=fraction,
        default=0.05,
        help="fraction of the updates spent in the linear learning-rate warm-up, in [0, 1)",
    )
    optimisation.add_argument(
        "--gradient-accumulation-steps",
        type=positive_int,
        default=1,
        metavar="N",
        help="batches whose gradients are summed into one update",
    )
    optimisation.add_argument(
        "--stop-on-divergence",
        action="store_true",
        help="stop (exit 1) when the mean loss of 20 updates exceeds 3x the first update's; without it, a warning",
    )

    processes = train.add_argument_group("precision and processes")
    processes.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        default="no",
        help="autocast (fp16 only on CUDA); coefficients and master weights stay fp32",
    )
    processes.add_argument(
        "--fsdp",
        action="store_true",
        help="shard parameters, gradients and optimizer state with FSDP2 across the processes of a torchrun / "
        "accelerate launch (each replaced block with its neighbours in one unit); with --mixed-precision bf16, "
        "FSDP's bf16 compute with fp32 master weights",
    )

    outputs = train.add_argument_group("checkpoints and Hub")
    outputs.add_argument(
        "--output-dir", default="outputs/repl", metavar="DIR", help="model, results.json and checkpoint-N/ go here"
    )
    outputs.add_argument(
        "--checkpointing-steps",
        type=positive_int,
        metavar="N",
        help="write checkpoint-N/ every N updates (default: no checkpoint, only the final model)",
    )
    outputs.add_argument(
        "--resume-from",
        metavar="DIR",
        help="a checkpoint-N/ directory written with --checkpointing-steps (default: start from scratch)",
    )
    outputs.add_argument(
        "--report-to", nargs="*", default=[], metavar="TRACKER", help="trackers for Accelerate: tensorboard, wandb, ..."
    )
    outputs.add_argument(
        "--push-to-hub", action="store_true", help="push the model, results and a model card at the end"
    )
    outputs.add_argument(
        "--hub-model-id", metavar="USER/NAME", help="the Hub repository (default: the output directory's name)"
    )
    outputs.add_argument("--hub-token", help="default: the token of `hf auth login` or HF_TOKEN")


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a model with RepL (or --baseline) and evaluate it",
        description="Train an image classifier with Replacement Learning (or --baseline), evaluate it on the "
        "test split and save it with its image processor and results.json.",
        formatter_class=_HelpFormatter,
    )
    model_and_data = train.add_argument_group("model and data")
    model_and_data.add_argument(
        "--model",
        default="vit-mini",
        help="preset (vit-mini, vit-tiny, deit-small, convnext-tiny, ...), Hub id or local model dir",
    )
    _add_data_arguments(model_and_data)
    model_and_data.add_argument(
        "--image-size",
        type=positive_int,
        metavar="PIXELS",
        help="input resolution (default: the data's, or the pretrained model's)",
    )
    model_and_data.add_argument(
        "--max-train-samples",
        type=positive_int,
        metavar="N",
        help="train on a random subset of N images, seeded (default: the whole train split)",
    )
    _add_replacement_arguments(train.add_argument_group("RepL", "which blocks are replaced, and how"))
    _add_training_arguments(train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-replacement",
        description="Replacement Learning (RepL) for Transformers vision models.",
        epilog="`hf-replacement COMMAND --help` lists a command's flags with their defaults.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_command(commands)

    evaluate = commands.add_parser(
        "evaluate",
        help="accuracy of a saved RepL or merged image classifier (other tasks: see docs/cli.md)",
        description="Print, as JSON, the top-1 accuracy of a saved image classifier on a data set's test split.",
        formatter_class=_HelpFormatter,
    )
    evaluate.add_argument(
        "checkpoint", help="directory written by train, save_pretrained or merge (a RepL or a plain model)"
    )
    _add_data_arguments(evaluate.add_argument_group("data"))

    merge = commands.add_parser(
        "merge",
        help="write a RepL checkpoint as a plain Transformers model, with its tokenizer / processor files",
        description="Synthesize every replaced block's weights once and write an ordinary Transformers model, "
        "with the checkpoint's processing files (image processor, tokenizer, ...), that the Auto class and "
        "pipeline of its task load without hf_replacement.",
        formatter_class=_HelpFormatter,
    )
    merge.add_argument(
        "checkpoint", help="a RepL checkpoint directory: a train --output-dir, a checkpoint-N/ or a save_pretrained"
    )
    merge.add_argument("output_dir", help="where the plain model goes: a new or empty directory")
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
    with _process_group_released():
        results = train(options)
        from accelerate import PartialState

        if PartialState().is_main_process:
            _report(results, options.output_dir)
    return 0


@contextlib.contextmanager
def _process_group_released() -> Iterator[None]:
    """Destroy the process group a multi-process run created (torchrun, accelerate launch) before the
    interpreter exits; one the caller had initialized is left to the caller.

    Left to the interpreter's exit, the gloo group and its worker threads are freed during finalization,
    where a thread still joinable aborts the process ("terminate called without an active exception")
    and torch warns that destroy_process_group() was not called. The model and optimizer hold the group
    through reference cycles (FSDP hooks, DTensor meshes): they are collected first.
    """
    import torch.distributed as dist

    created_here = not (dist.is_available() and dist.is_initialized())
    try:
        yield
    finally:
        if created_here and dist.is_available() and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()


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
    except KeyboardInterrupt as interrupt:
        parser.exit(130, f"hf-replacement {args.command}: {_interrupted(args, interrupt)}\n")
    except Exception as error:
        status = _exit_status(error)
        if status is None:  # a bug: its traceback
            raise
        parser.exit(status, f"hf-replacement {args.command}: error: {error}\n")


def _interrupted(args: argparse.Namespace, interrupt: KeyboardInterrupt) -> str:
    from .save_guard import SaveInterrupted, what_is_intact

    if isinstance(interrupt, SaveInterrupted):
        return str(interrupt)
    if args.command == "train":
        return f"interrupted (Ctrl-C); {what_is_intact(args.output_dir)}."
    return "interrupted (Ctrl-C); nothing was written." if args.command == "merge" else "interrupted (Ctrl-C)."


def _exit_status(error: Exception) -> int | None:
    """2 for bad input, 1 for the disk's or the run's fault (reported in one line); None for anything else, a bug
    that shows its traceback. The error types are imported when a command failed, not before parsing (torch)."""
    from ..hub import HubError
    from .save_guard import SaveError
    from .training_steps import DivergenceError, NonFiniteLossError

    if isinstance(error, (ValueError, FileNotFoundError, NonFiniteLossError, HubError)):
        return 2
    if isinstance(error, (SaveError, DivergenceError)):
        return 1
    return None


if __name__ == "__main__":
    sys.exit(main())
