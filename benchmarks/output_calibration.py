"""Would fitting RepL's coefficients to a replaced block's outputs beat fitting them to its weights?

For each model of the `transfer` suite, pretrained on Fashion-MNIST by the suite's own pretraining
(`harness.transfer.pretrain`, cached), every 4th block is replaced and the Fashion-MNIST test accuracy is
measured right after conversion, with the coefficients:

- `0.5`: a = b = 0.5, the default;
- `weight fit`: `coefficient_init="fit"`, least squares on the block's own weights;
- `output fit`: the weight fit, then each replaced block's coefficients trained (L-BFGS) so that the
  block's output on a few calibration batches of training images matches the original block's output
  for the same images, block after block in forward order (a later block sees the inputs the converted
  model gives it, earlier replacements included).

Also reported per replaced block: the relative output error ||f(x) - f₀(x)|| / ||f₀(x) - x|| on the
calibration images (f₀ the original block, f the replaced one, x its input: the share of the block's
residual update that the replacement gets wrong). Writes `output_calibration.json` and
`output_calibration.md` beside this file (or `--output-dir`). Run from the repository root:

    python benchmarks/output_calibration.py
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness.data import eval_batches, load_tensor_data
from benchmarks.harness.device import machine_info
from benchmarks.harness.paths import BENCHMARKS_DIR, suite_dir
from benchmarks.harness.suites import get_suite
from benchmarks.harness.transfer import pretrain, source_suite
from hf_replacement import ReplacementConfig, get_replacement_model
from hf_replacement.checkpoint import write_checkpoint
from hf_replacement.commands.training_steps import evaluate_accuracy
from hf_replacement.loading import load_image_classifier

NAME = "output_calibration"
GRANULARITIES = ("block", "tensor", "channel")
INITS = ("0.5", "weight fit", "output fit")


def block_io(model: torch.nn.Module, block: torch.nn.Module, pixels: torch.Tensor) -> tuple[tuple, dict, torch.Tensor]:
    """(positional args, keyword args, output) of `block` in one no-grad forward of `model` on `pixels`."""
    captured: dict[str, Any] = {}

    def before(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    def after(module, args, output):
        captured["output"] = output

    handles = [block.register_forward_pre_hook(before, with_kwargs=True), block.register_forward_hook(after)]
    try:
        with torch.no_grad():
            model(pixel_values=pixels)
    finally:
        for handle in handles:
            handle.remove()
    return captured["args"], captured["kwargs"], captured["output"]


def output_error(block: torch.nn.Module, args: tuple, kwargs: dict, target: torch.Tensor) -> float:
    """||f(x) - f₀(x)|| / ||f₀(x) - x||: the share of the original block's update the block gets wrong."""
    with torch.no_grad():
        return float((block(*args, **kwargs) - target).norm() / (target - args[0]).norm())


def calibrate(model, original, pixels: torch.Tensor, steps: int) -> dict[str, dict[str, float]]:
    """Train each replaced block's coefficients (only) to match the original block's output, in forward order;
    return each block's relative output error before and after."""
    errors = {}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for index, name in sorted(model.replaced_blocks.items()):
        block = model.base_model.get_submodule(name)
        args, kwargs, _ = block_io(model, block, pixels)  # inputs as the converted model gives them
        target = block_io(original, original.get_submodule(name), pixels)[2]  # what the original block made of ...
        # ... its own inputs; the converted block is asked to map its inputs to that.
        coefficients = model.replacement_coefficients.get_parameter(str(index))
        coefficients.requires_grad_(True)
        before = output_error(block, args, kwargs, target)
        optimizer = torch.optim.LBFGS([coefficients], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(block(*args, **kwargs), target)
            loss.backward()
            return loss

        optimizer.step(closure)
        coefficients.requires_grad_(False)
        errors[str(index)] = {"before": before, "after": output_error(block, args, kwargs, target)}
    return errors


def block_output_errors(model, original, pixels: torch.Tensor) -> dict[str, float]:
    """Each replaced block's relative output error on `pixels`, inputs as the converted model gives them."""
    errors = {}
    for index, name in sorted(model.replaced_blocks.items()):
        block = model.base_model.get_submodule(name)
        args, kwargs, _ = block_io(model, block, pixels)
        target = block_io(original, original.get_submodule(name), pixels)[2]
        errors[str(index)] = output_error(block, args, kwargs, target)
    return errors


def measure(directory: str, data, calibration: torch.Tensor, steps: int) -> dict[str, Any]:
    original = load_image_classifier(directory).eval()
    result: dict[str, Any] = {"pretrained_accuracy": evaluate_accuracy(original, eval_batches(data, "cpu"))}
    for granularity in GRANULARITIES:
        for init in INITS:
            started = time.perf_counter()
            config = ReplacementConfig(
                coefficient_granularity=granularity,
                coefficient_init="fit" if init != "0.5" else (0.5, 0.5),
            )
            model = get_replacement_model(copy.deepcopy(original), config).eval()
            entry: dict[str, Any] = {}
            if init == "output fit":
                entry["block_output_error"] = calibrate(model, original, calibration, steps)
            else:
                entry["block_output_error"] = block_output_errors(model, original, calibration)
            entry["seconds"] = time.perf_counter() - started
            entry["accuracy"] = evaluate_accuracy(model, eval_batches(data, "cpu"))
            entry["coefficient_means"] = {
                index: [float(v) for v in parameter.detach().mean(1)]
                for index, parameter in model.replacement_coefficients.named_parameters()
            }
            result[f"{granularity}/{init}"] = entry
            logging.info("%s %s: accuracy %.4f", granularity, init, entry["accuracy"])
    return result


def render(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = [
        "# Output-matching calibration against the weight fit",
        "",
        f"- command: `{results['command']}`",
        f"- machine: {results['machine']['cpu']}, torch {results['machine']['torch']}",
        "- pretrained here (seed 0): {dataset}, {max_train_samples} training images, {epochs} epochs, batch "
        "{batch_size}, AdamW lr {lr}; measured on {data}".format(**settings["pretraining"], data=results["data"]),
        f"- calibration: {settings['calibration_images']} training images, L-BFGS, at most {settings['steps']} "
        "iterations per replaced block; replace_interval=4",
        "",
        "Fashion-MNIST test accuracy right after conversion (no fine-tuning step), and per replaced block the "
        "relative output error on the calibration images (||f(x) − f₀(x)|| / ||f₀(x) − x||).",
        "",
    ]
    for model_name, model in results["models"].items():
        lines += [
            f"### {model_name} (pretrained: {100 * model['pretrained_accuracy']:.1f}%)",
            "",
            "| granularity | " + " | ".join(f"{init}: accuracy" for init in INITS)
            + " | " + " | ".join(f"{init}: block output error" for init in INITS) + " |",
            "|---|" + "---|" * (2 * len(INITS)),
        ]
        for granularity in GRANULARITIES:
            entries = [model[f"{granularity}/{init}"] for init in INITS]
            errors = []
            for entry in entries:
                values = entry["block_output_error"]
                after = {k: v["after"] if isinstance(v, dict) else v for k, v in values.items()}
                errors.append(", ".join(f"{k}: {v:.3f}" for k, v in after.items()))
            lines.append(
                f"| {granularity} | " + " | ".join(f"{100 * e['accuracy']:.1f}" for e in entries)
                + " | " + " | ".join(errors) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None, help="presets (default: the transfer suite's)")
    parser.add_argument("--pretrain-epochs", type=int, default=None)
    parser.add_argument("--pretrain-max-train-samples", type=int, default=None)
    parser.add_argument("--source-test-samples", type=int, default=None,
                        help="Fashion-MNIST test images to measure on (default: the transfer suite's)")
    parser.add_argument("--cache-dir", default=suite_dir("transfer"),
                        help="where pretrained/<model> is kept (default: the transfer suite's directory)")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50, help="L-BFGS iterations per replaced block")
    parser.add_argument("--output-dir", default=BENCHMARKS_DIR)
    args = parser.parse_args(argv)
    suite = get_suite(
        "transfer",
        models=args.models,
        pretrain_epochs=args.pretrain_epochs,
        pretrain_max_train_samples=args.pretrain_max_train_samples,
        pretrain_max_test_samples=args.source_test_samples,
    )
    device = torch.device("cpu")
    data = load_tensor_data(source_suite(suite))
    generator = torch.Generator().manual_seed(0)
    calibration = data.train_x[torch.randperm(len(data.train_y), generator=generator)[: args.calibration_images]]
    results: dict[str, Any] = {
        "command": " ".join(["python benchmarks/output_calibration.py", *map(shlex.quote, sys.argv[1:])]),
        "machine": machine_info(device),
        "data": data.description,
        "settings": {
            "pretraining": dataclasses.asdict(suite.pretrain),
            "calibration_images": len(calibration),
            "steps": args.steps,
        },
        "models": {},
    }
    for model_name in suite.models:
        directory, record = pretrain(suite, model_name, data, args.cache_dir, device)
        results["models"][model_name] = {"pretraining": record, **measure(directory, data, calibration, args.steps)}
    write_checkpoint(args.output_dir, {
        f"{NAME}.json": json.dumps(results, indent=1) + "\n",
        f"{NAME}.md": render(results),
    })
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
