"""Benchmark: RepL against ordinary training and its alternatives, same model/data/seed, one run.

`hf-replacement benchmark --suite quick` (or `python -m hf_replacement.benchmark`) trains and
measures, in one process, every method on every model of a suite:

- `bp`: ordinary training (back-propagation through the whole plain model);
- `repl-k4`, `repl-k3`: Replacement Learning, every k-th block replaced (`ReplacementConfig`);
- `repl-k4-recompute`: as `repl-k4`, the replaced blocks' activations recomputed in backward;
- `drop-k4`, `drop-k3`: the blocks RepL would replace deleted (a shallower model: the ablation
  RepL must beat, since it is cheaper still);
- `freeze-k4`, `freeze-k3`: the same blocks kept at their initial weights, not trained;
- `lora`: PEFT LoRA (r=8) on the attention q/v projections (ViT/DeiT) or the pointwise Linear layers
  (ConvNeXt), the classifier trained fully.

Per method and model it reports trainable/total parameters, training memory (on CPU: the exact
bytes of parameters + buffers + gradients + optimizer state, and the bytes autograd saves for
backward in one forward; on CUDA also `max_memory_allocated`), the median step time (warm-up
excluded, methods interleaved in rounds so drift hits them alike) with the share of a RepL step
spent synthesizing weights, test accuracy mean ± std over seeds with per-epoch curves, the
checkpoint size and the inference throughput of the merged model. It writes `results.json`,
`results.md`, `accuracy_curves.png` and `coefficients.png`, each atomically.

Each file here does one part: `methods` builds each method's model, `suites` says what a run does,
`data` and `device` provide its tensors and device, `meters` and `measure` measure memory and time,
`training` trains for accuracy, `runner` runs it all, `report`, `plots` and `output` write the
results, `cli` reads the flags.
"""

from .cli import add_benchmark_arguments, main, run_benchmark_from_args, suite_from_args
from .device import machine_info
from .errors import BenchmarkError
from .meters import SavedTensorMeter, state_memory
from .methods import DEFAULT_METHODS, METHODS, Method, MethodModel, apply_lora, build_method_model, drop_blocks, freeze_blocks
from .output import atomic_write
from .runner import run_benchmark
from .suites import SUITES, SuiteSpec, get_suite
from .training import make_optimizer, train_step

__all__ = [
    "BenchmarkError",
    "DEFAULT_METHODS",
    "METHODS",
    "Method",
    "MethodModel",
    "SUITES",
    "SavedTensorMeter",
    "SuiteSpec",
    "add_benchmark_arguments",
    "apply_lora",
    "atomic_write",
    "build_method_model",
    "drop_blocks",
    "freeze_blocks",
    "get_suite",
    "machine_info",
    "main",
    "make_optimizer",
    "run_benchmark",
    "run_benchmark_from_args",
    "state_memory",
    "suite_from_args",
    "train_step",
]
