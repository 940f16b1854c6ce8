"""The benchmark harness: every method on every model of a suite, trained and measured in one process.

Methods (`methods.METHODS`):

- `bp`: ordinary training (back-propagation through the whole plain model);
- `repl-k4`, `repl-k3`: Replacement Learning, every k-th block replaced (`ReplacementConfig`);
- `repl-k4-recompute`: as `repl-k4`, the replaced blocks' activations recomputed in backward;
- `repl-k4-fit`: as `repl-k4`, the coefficients fitted to the pretrained weights (`coefficient_init="fit"`;
  the `transfer` suite);
- `drop-k4`, `drop-k3`: the blocks RepL would replace deleted (a shallower model: the ablation
  RepL must beat, since it is cheaper still);
- `freeze-k4`, `freeze-k3`: the same blocks kept at their initial weights, not trained;
- `tie-k4`: plain cross-layer sharing, RepL with the coefficients fixed at (1, 0): each replaced block reuses
  its previous neighbour's weights (what RepL's learnable fusion must beat);
- `sd`: stochastic depth on the plain model, each block skipped in training with the probability that gives
  drop-k4's expected depth; the full model for inference;
- `narrow`: the plain model at the same depth, narrowed to repl-k4's trainable parameter count;
- `lora`: PEFT LoRA (r=8) on the attention q/v projections (ViT/DeiT) or the pointwise Linear layers
  (ConvNeXt), the classifier trained fully.

Per method and model it reports trainable/total parameters, training memory (on CPU: the exact
bytes of parameters + buffers + gradients + optimizer state, and the bytes autograd saves for
backward in one forward; on CUDA also `max_memory_allocated`), the median step time (warm-up
excluded, methods interleaved in rounds so drift hits them alike) with the share of a RepL step
spent synthesizing weights, test accuracy mean ± std over seeds with per-epoch curves, the
checkpoint size and the inference throughput of the merged model. It writes `results.json`,
`results.md`, `accuracy_curves.png` and `coefficients.png`, replaced together.

Each file here does one part: `methods` builds each method's model, `suites` says what a run does,
`data` and `device` provide its tensors and device, `meters` and `measure` measure memory and time,
`baselines` builds the stochastic-depth and narrow baselines, `training` trains for accuracy, `resume` keeps
each finished piece of a run so that a rerun continues (refusing pieces made with other settings), `verdict`
decides the paper's claims against each baseline, `transfer` pretrains (transfer suites) and measures each
conversion on the source task, `runner` runs it all, `report`, `plots` and `output` write the
results, `readme` writes benchmarks/README.md, `paths` says where files go, `cli` reads the flags.
Training steps, optimizer, schedule and accuracy are `hf_replacement.commands.training_steps`, shared with the launcher.
"""

from .cli import add_benchmark_arguments, main, run_benchmark_from_args, suite_from_args
from .device import machine_info
from .errors import BenchmarkError
from .meters import SavedTensorMeter, SynthesisCounter, state_memory
from .methods import (
    DEFAULT_METHODS,
    METHODS,
    Method,
    MethodModel,
    apply_lora,
    build_method_model,
    drop_blocks,
    freeze_blocks,
)
from .readme import render_readme, write_readme
from .runner import run_benchmark
from .suites import SUITES, SuiteSpec, get_suite

__all__ = [
    "BenchmarkError",
    "DEFAULT_METHODS",
    "METHODS",
    "Method",
    "MethodModel",
    "SUITES",
    "SavedTensorMeter",
    "SuiteSpec",
    "SynthesisCounter",
    "add_benchmark_arguments",
    "apply_lora",
    "build_method_model",
    "drop_blocks",
    "freeze_blocks",
    "get_suite",
    "machine_info",
    "main",
    "render_readme",
    "run_benchmark",
    "run_benchmark_from_args",
    "state_memory",
    "suite_from_args",
    "write_readme",
]
