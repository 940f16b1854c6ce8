"""What one benchmark run does: the suite specification, the standard suites and their checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hf_replacement.commands.presets import PRESETS

from .errors import BenchmarkError
from .methods import BASELINE_METHODS, DEFAULT_METHODS, METHODS, TRANSFER_METHODS, resolve_methods
from .tasks import CLASSIFICATION, TASKS


@dataclass(frozen=True)
class PretrainSpec:
    """A transfer suite's pretraining (`transfer.py`): each model, seed 0, trained on `dataset` before the
    methods are compared fine-tuning it on the suite's data set. AdamW, cosine schedule, as for fine-tuning."""

    dataset: str
    epochs: int
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    warmup_ratio: float = 0.1


@dataclass(frozen=True)
class SuiteSpec:
    """Everything one benchmark run does; `SUITES` holds the standard ones, `dataclasses.replace` tunes them.

    `methods` are all measured (memory, time, checkpoint, throughput); `accuracy_methods` (default:
    all of them) are also trained over `seeds` seeds. `dataset=None` uses random tensors and trains
    nothing (memory/time only). With `pretrain` the models are first pretrained on another data set and
    every method starts from those weights (a transfer suite: fine-tuning). `task` (`tasks.TASKS`) names what
    is trained and scored; for a task other than image classification `models` are that task's models,
    `dataset` names its data, `image_size` is the task's sample size (canvas side, or bytes per text block),
    and `max_train_samples` / `max_test_samples` are the numbers of samples composed or read (required).
    """

    name: str
    summary: str  # one line: what the suite runs and how long it takes; the CLI help and README show it
    models: tuple[str, ...]
    dataset: str | None
    image_size: int
    num_channels: int = 1
    num_labels: int = 10  # synthetic data only; a data set brings its own
    methods: tuple[str, ...] = DEFAULT_METHODS
    accuracy_methods: tuple[str, ...] | None = None
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    # Training: AdamW (hf_replacement.commands.training_steps.make_optimizer), cosine schedule with linear warm-up.
    seeds: int = 3
    epochs: int = 10
    batch_size: int = 64
    timing_batch_size: int | None = None  # default: batch_size
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    timing_warmup_steps: int = 3
    timing_rounds: int = 4
    timing_steps_per_round: int = 5
    inference_batch_size: int = 256
    inference_rounds: int = 5
    inference_calls_per_round: int = 3
    mixed_precision: str | None = None  # "bf16": autocast
    # Also measured under torch.compile (training steps: median, images/s, CUDA peak), one method at a time.
    compiled_methods: tuple[str, ...] = ()
    compile_backend: str = "inductor"
    requires_cuda: bool = False
    pretrain: PretrainSpec | None = None
    notes: tuple[str, ...] = ()
    # Added after the first committed runs: left out of resume digests at their defaults (resume.py).
    task: str = CLASSIFICATION
    max_grad_norm: float | None = None  # clip the gradients' global norm before each update (DETR's recipe)

    @property
    def trains(self) -> bool:
        return self.dataset is not None and self.epochs > 0

    def trained_methods(self) -> list[str]:
        wanted = self.methods if self.accuracy_methods is None else resolve_methods(self.accuracy_methods)
        return [m for m in self.methods if m in wanted] if self.trains else []


# The task suites' shared settings: the issue's six methods less those a task's model cannot take (tasks.py's
# not_applicable, stated in TASK_SUITE_NOTE), trained over 3 seeds; a short timing (steps of 0.1-0.5 s).
TASK_METHODS = ("bp", "repl-k4", "drop-k4", "tie-k4", "sd")
TASK_SUITE_SETTINGS: dict[str, Any] = {
    "methods": TASK_METHODS, "timing_rounds": 3, "timing_steps_per_round": 2, "timing_warmup_steps": 2,
    "inference_batch_size": 64, "inference_rounds": 3,
}
TASK_SUITE_NOTE = (
    "Methods: bp, repl-k4, drop-k4, tie-k4 and sd, trained over 3 seeds; repl-k4-half is not applicable to these "
    "task models, nor narrow to SegFormer and DETR (the reasons are listed below); on GPT-2, narrow is measured "
    "(parameters, memory, time) but not trained, as in the fashion-mnist-full suite."
)
# Summaries: the one-thread CPU time of the training, from one step per method measured interleaved on the loaded
# 2-core VM (thread_time, median of 5 steps at the suite's batch, gradient clipping included; 2026-12-06): GPT-2
# 0.40-0.49 s, SegFormer 0.19-0.22 s, DETR 0.041-0.055 s per step, plus the evaluations. Two threads on 2 idle cores
# take roughly 1.3-1.6x less: about an hour with the measurements.
CAUSAL_LM_SUMMARY = ("GPT-2 (8 blocks, 128 wide) on the standard library's bytes, perplexity per byte, 3 seeds: "
                     "about 1 h on 2 CPU cores (73 min of one-thread CPU time, estimated from one step per method)")
SEGMENTATION_SUMMARY = ("SegFormer (MiT, 10 blocks) on Fashion-MNIST canvases, mIoU, 3 seeds: about 1 h on 2 CPU cores "
                        "(72 min of one-thread CPU time, estimated from one step per method)")
DETECTION_SUMMARY = ("DETR with a ResNet backbone (13 blocks in 3 chains) on Fashion-MNIST canvases, mAP@0.5, 3 seeds: "
                     "about 1 h on 2 CPU cores (74 min of one-thread CPU time, estimated from one step per method)")

SUITES: dict[str, SuiteSpec] = {
    # 2 CPU cores: 13 min with 8 methods; 25 min with the two surrogates added, partly alongside tests (results.md);
    # the three equal-cost baselines (tie-k4, sd, narrow) add about a quarter (estimated, not yet run).
    "quick": SuiteSpec(
        name="quick",
        summary="digits, vit-mini + convnext-mini, 3 seeds: 20-30 min on 2 CPU cores",
        models=("vit-mini", "convnext-mini"),
        dataset="digits",
        image_size=8,
        epochs=8,
        batch_size=64,
        lr=1e-3,
        warmup_ratio=0.2,
        # Steps of a few tens of ms on a shared 2-core VM: 60 interleaved steps per method keep the
        # step ratios within a few percent from run to run (20 did not).
        timing_rounds=12,
        methods=DEFAULT_METHODS + BASELINE_METHODS,
        accuracy_methods=tuple(m for m in DEFAULT_METHODS + BASELINE_METHODS if not m.endswith("-recompute")),
        notes=("digits: scikit-learn's 8x8 grayscale digits, 80/20 train/test split fixed (seed 0); "
               "seeds vary the initialisation and the data order.",
               "repl-k4-recompute does the same arithmetic as repl-k4 (identical losses, checked in "
               "tests/test_benchmark.py): measured for memory/time, not retrained, to keep the suite short."),
    ),
    # 2 CPU cores: 45 min for 27 runs before the two surrogates were added (benchmarks/fashion-mnist/results.md);
    # 45 runs now, the added ones cheaper than bp: about 75 min estimated on that machine. The committed run has
    # ViT-tiny only (`--models vit-tiny`, 15 runs, ~45 min): that day the VM ran 2-2.5x slower, and all three
    # models would have taken over 2 h. The 12-block ViT/DeiT-tiny take
    # ~0.4 s per step of 32 at 28x28 and ConvNeXt-tiny (stride-2 stem) ~0.46 s, so a full 60k epoch (12-15 min
    # per run) cannot fit: a random subset of the data, and the methods that differ in accuracy are trained.
    "fashion-mnist": SuiteSpec(
        name="fashion-mnist",
        summary="ViT/DeiT/ConvNeXt-tiny at 28x28 on a Fashion-MNIST subset, 3 seeds: 75 min or more on 2 CPU cores",
        models=("vit-tiny", "deit-tiny", "convnext-tiny"),
        dataset="fashion-mnist",
        image_size=28,
        methods=DEFAULT_METHODS,
        accuracy_methods=("bp", "repl-k4", "repl-k4-mlp", "repl-k4-half", "drop-k4"),
        epochs=3,
        # Probed on vit-tiny bp (seed 0): lr 2e-3 / 5% warm-up / batch 64 left it at 20% test accuracy
        # after 3 epochs; 1e-3 / 20% / 64: 53%; 1e-3 / 20% / 32: 59% (twice the updates, same time).
        batch_size=32, lr=1e-3, warmup_ratio=0.2,
        max_train_samples=2048, max_test_samples=1000,
        timing_rounds=3, timing_steps_per_round=2, timing_warmup_steps=2,
        inference_batch_size=64, inference_rounds=3,
        notes=("Fashion-MNIST subsampled (a random subset, seed 0) so the suite fits about an hour on 2 CPU cores "
               "with 3 seeds (a step of 32 takes ~0.4 s on ViT/DeiT-tiny at 28 px and ConvNeXt-tiny with its "
               "stride-2 stem): about two hundred updates from scratch, so accuracies are far below full-data numbers.",
               "Trained for accuracy: bp, repl-k4, its lighter surrogates repl-k4-mlp and repl-k4-half, and the "
               "ablation they must beat, drop-k4; the other methods are "
               "measured (memory, time, checkpoint, throughput) only. repl-k4-recompute does the same arithmetic "
               "as repl-k4; lora would adapt a random network."),
    ),
    # Fine-tuning: each model pretrained here on Fashion-MNIST (cached in <output dir>/pretrained/), then every
    # method fine-tunes it on the digits. Mini models at 28 px so that a full pretraining (2 models x 2 epochs of
    # 60k images) and 36 fine-tuning runs take about an hour on 2 CPU cores: 69 min in the committed run
    # (results.md), pretraining 42 min of it while a test run shared the cores, fine-tuning 25 min.
    "transfer": SuiteSpec(
        name="transfer",
        summary="vit-mini + convnext-mini pretrained on Fashion-MNIST, fine-tuned on digits, 3 seeds: "
                "about 1 h on 2 CPU cores (pretraining cached after the first run)",
        models=("vit-mini", "convnext-mini"),
        dataset="digits",
        image_size=28,
        methods=TRANSFER_METHODS,
        epochs=10,
        batch_size=64,
        lr=1e-3,
        warmup_ratio=0.1,
        timing_rounds=6,
        pretrain=PretrainSpec("fashion-mnist", epochs=2, max_test_samples=5000, batch_size=64, lr=2e-3),
        notes=(
            "Pretrained here, never downloaded: each preset (seed 0) trained on all 60k Fashion-MNIST training "
            "images (clothing, 28x28; source accuracy on 5000 test images), saved under pretrained/ in the output "
            "directory and reused by later runs with the same settings. Fine-tuned on scikit-learn's digits "
            "(handwritten digits, 8x8 upscaled to 28x28, 80/20 split): another domain with another label meaning "
            "and few images (1437 to train), the setting fine-tuning is for; every method starts from the same "
            "pretrained body and a new classifier head (seeded).",
            "source acc. = Fashion-MNIST test accuracy of the pretrained model right after the method's conversion, "
            "before any fine-tuning step (bp and LoRA: the pretrained model itself; drop-k4: without the blocks); "
            "fit error = the relative error ||w - ŵ|| / ||w|| with which the fitted coefficients rebuild each "
            "replaced block's pretrained weights (a=b=0.5 in brackets).",
            "One learning rate for every method (AdamW 1e-3, cosine): LoRA usually wants a larger one, so its "
            "accuracy here is a floor. Memory, step time and checkpoint size are measured on the presets as built "
            "(weight values do not change them).",
        ),
    ),
    # Resumable over several sittings (runs/ beside results.json). Planned from the committed transfer suite's step
    # times at batch 64 (vit-mini 207 ms, convnext-mini 141 ms on 2 cores) at about 8 h; the committed run took
    # 6.1 h of training at one thread per run (vit-mini 12-17 min a run, convnext-mini 4.5-6 min). 5 epochs: the
    # transfer suite's pretraining reached 81% (vit-mini) and 88% (convnext-mini) after 2; the number was fixed
    # before any run of this suite. Rerun the same command after an interruption and it continues.
    "fashion-mnist-full": SuiteSpec(
        name="fashion-mnist-full",
        summary="all of Fashion-MNIST (60k/10k), vit-mini + convnext-mini at 28 px, 5 epochs, RepL against "
                "tying, stochastic depth and dropping, 3 seeds: about 6 h of one core, resumable, seeds in parallel",
        models=("vit-mini", "convnext-mini"),
        dataset="fashion-mnist",
        image_size=28,
        methods=("bp", "repl-k4", "repl-k4-half", "drop-k4") + BASELINE_METHODS,
        accuracy_methods=("bp", "repl-k4", "repl-k4-half", "drop-k4", "tie-k4", "sd"),
        epochs=5,
        notes=("All 60 000 Fashion-MNIST training images and the 10 000 test images, at 28 px; the training "
               "settings are the harness defaults (AdamW 2e-3, batch 64, 5% warm-up, cosine), fixed before any "
               "run, never tuned on the test set.",
               "narrow is measured (parameters, memory, time) but not trained: the issue's resolving budget "
               "names bp, repl-k4, repl-k4-half, drop-k4, tie-k4 and sd; add it with `--methods` and the same "
               "output directory to train it too (the measured methods are part of the settings: start afresh)."),
    ),
    # CUDA only: memory and time at 224x224 in bf16 autocast, random data, nothing trained. Estimated (never run
    # yet) at well under 10 minutes on one H100, most of it compiling: 6 compiled models at up to a minute each.
    "gpu": SuiteSpec(
        name="gpu",
        summary="ViT-B/16 and ConvNeXt-T at 224x224 in bf16, memory, images/s and peak memory per method, eager "
                "and torch.compile (needs CUDA; under 10 min on one GPU)",
        models=("vit-base", "convnext-tiny"),
        dataset=None,
        image_size=224,
        num_channels=3,
        num_labels=1000,
        methods=("bp", "repl-k4", "repl-k4-half", "drop-k4") + BASELINE_METHODS,
        compiled_methods=("bp", "repl-k4", "drop-k4"),
        epochs=0,
        batch_size=64,
        timing_rounds=5, timing_steps_per_round=5, timing_warmup_steps=5,
        inference_batch_size=256,
        mixed_precision="bf16",
        requires_cuda=True,
        notes=("Random 224x224 RGB tensors, bf16 autocast, fp32 master weights and AdamW state.",
               "torch.compile (inductor) for bp, repl-k4 and drop-k4 only: compiling takes far longer than the "
               "timed steps, and these three answer whether compiling changes RepL's cost against bp and "
               "dropping; sd's per-batch skip is Python control flow (a graph break per block)."),
    ),
    # The paper's other tasks (issue 27, item 3), each on its task model and offline data (tasks.py), sized to about
    # an hour on 2 idle cores from one step per method (the summaries' CPU times): 15 runs of about 3 minutes plus
    # the measurements. Estimated, not yet run; the training settings were fixed before any run.
    "causal-lm": SuiteSpec(
        name="causal-lm",
        summary=CAUSAL_LM_SUMMARY,
        task="causal-lm",
        models=("gpt2-tiny",),
        dataset="stdlib-bytes",
        image_size=64,
        **{**TASK_SUITE_SETTINGS, "methods": (*TASK_METHODS, "narrow"), "accuracy_methods": TASK_METHODS},
        epochs=3, batch_size=32, lr=1e-3, warmup_ratio=0.1,
        max_train_samples=6144, max_test_samples=1024,
        notes=(TASK_SUITE_NOTE, "Perplexity per byte on held-out blocks of 64 bytes from every 10th .py file of the "
               "standard library (the others train), lower is better; results.json keeps it under the accuracy keys."),
    ),
    "segmentation": SuiteSpec(
        name="segmentation",
        summary=SEGMENTATION_SUMMARY,
        task="semantic-segmentation",
        models=("segformer-tiny",),
        dataset="fashion-mnist-canvases",
        image_size=56,
        **TASK_SUITE_SETTINGS,
        epochs=10, batch_size=32, lr=2e-3, warmup_ratio=0.1,
        max_train_samples=4096, max_test_samples=1000,
        notes=(TASK_SUITE_NOTE, "mIoU: per class (11, background included) intersection over union of the predicted "
               "and true pixels, each summed over all held-out canvases, then the mean over the classes "
               "(tasks.py, task_metrics.py); results.json keeps it under the accuracy keys."),
    ),
    "detection": SuiteSpec(
        name="detection",
        summary=DETECTION_SUMMARY,
        task="object-detection",
        models=("detr-tiny",),
        dataset="fashion-mnist-canvases",
        image_size=56,
        **TASK_SUITE_SETTINGS,
        epochs=15, batch_size=32, lr=1e-3, weight_decay=1e-4, warmup_ratio=0.05, max_grad_norm=0.1,
        max_train_samples=12288, max_test_samples=1000,
        notes=(TASK_SUITE_NOTE, "mAP@0.5: PASCAL VOC's all-point interpolated AP per class (a duplicate detection "
               "is a false positive), averaged over the classes in the held-out ground truth; each of DETR's 8 "
               "queries is one detection scored by its best class's probability (task_metrics.py). Learning rate "
               "1e-3, weight decay 1e-4 and the gradients' norm clipped at 0.1 (DETR's recipe), as "
               "examples/object_detection.py trains, fixed before any run. DETR's own code would freeze its "
               "Transformers ResNet backbone at its random initialisation (tasks.build_detr_tiny): here it trains. "
               "results.json keeps mAP under the accuracy keys.",
               "sd did not train DETR: its seed 0 reached mAP@0.5 0.02 with a training loss of 4.5 after 15 epochs "
               "(bp: 0.73, 0.61). A 3-epoch smoke on 2048 canvases of a LayerDrop-style variant (kept post-norm "
               "layers returned unscaled) lagged bp as much as the shipped one (loss 7.42 against 7.38, bp 6.11), "
               "so it was not adopted. No one group of blocks explains it: `python benchmarks/sd_ablation.py` "
               "(sd_ablation.md; the same smoke, 3 seeds, sd on some blocks only) gives a final training loss of "
               "6.08 (6.04-6.11) for bp and 6.23 (5.63-6.80) for bp through sd's arithmetic at p = 1e-9 (the "
               "smoke's noise); the runs skipping only the encoder layers, only the decoder layers or only the "
               "backbone blocks overlap that range (5.70-7.27, 6.60-7.45, 5.98-7.67), and only all 10 blocks "
               "together are above it in every seed (7.17-7.73). The verdict therefore does not judge RepL's mAP "
               "against sd on this suite (tasks.Task.untrainable): a working stochastic depth for DETR is still "
               "missing."),
    ),
}


def get_suite(name: str, **overrides: Any) -> SuiteSpec:
    """`SUITES[name]` with the non-None `overrides` applied (checked)."""
    if name not in SUITES:
        raise BenchmarkError(f"Unknown suite {name!r}; choose one of {', '.join(SUITES)}.")
    changes = {key: value for key, value in overrides.items() if value is not None}
    pretraining = {
        key.removeprefix("pretrain_"): changes.pop(key) for key in list(changes) if key.startswith("pretrain_")
    }
    if pretraining:
        if SUITES[name].pretrain is None:
            raise BenchmarkError(
                f"Suite {name!r} pretrains nothing: the pretraining flags ({', '.join(sorted(pretraining))}) apply to "
                f"{', '.join(n for n, s in SUITES.items() if s.pretrain) or 'no suite'}."
            )
        changes["pretrain"] = dataclasses.replace(SUITES[name].pretrain, **pretraining)
    if "methods" in changes:
        changes["methods"] = tuple(resolve_methods(changes["methods"]))
    if "models" in changes:
        changes["models"] = tuple(changes["models"])
    suite = dataclasses.replace(SUITES[name], **changes)
    validate_suite(suite)
    return suite


def validate_suite(suite: SuiteSpec) -> None:
    """Raise `BenchmarkError` for an unknown method or model or an impossible setting."""
    resolve_methods(suite.methods)
    if suite.task not in TASKS:
        raise BenchmarkError(f"Unknown task {suite.task!r}; choose one of {', '.join(TASKS)}.")
    if suite.seeds < 1 or suite.batch_size < 1 or suite.epochs < 0:
        raise BenchmarkError(
            "seeds and batch size must be >= 1 and epochs >= 0 "
            f"(got {suite.seeds}, {suite.batch_size}, {suite.epochs})."
        )
    if suite.task != CLASSIFICATION:
        _validate_task_suite(suite)
        return
    unknown = [m for m in suite.models if m not in PRESETS]
    if unknown:
        raise BenchmarkError(f"Unknown model(s) {unknown}; the benchmark builds presets: {', '.join(sorted(PRESETS))}.")
    if suite.pretrain is not None and (suite.dataset is None or suite.pretrain.epochs < 1):
        raise BenchmarkError("A pretraining suite needs a data set to fine-tune on and at least one pretraining epoch.")
    if suite.compiled_methods:  # those also among `methods` are compiled
        resolve_methods(suite.compiled_methods)
    narrow = [m for m in resolve_methods(suite.methods) if METHODS[m].kind == "narrow"]
    if suite.pretrain is not None and narrow:
        raise BenchmarkError(
            f"{', '.join(narrow)} cannot fine-tune: it builds a new, narrower model, for which no pretrained weights "
            f"exist. Leave it out of the pretraining suite {suite.name!r} (--methods without it)."
        )
    if suite.mixed_precision not in (None, "bf16"):
        raise BenchmarkError(f"mixed_precision={suite.mixed_precision!r}: only None or 'bf16' are supported.")


def _validate_task_suite(suite: SuiteSpec) -> None:
    """The checks of a suite of another task than image classification: its models, methods and sizes."""
    task = TASKS[suite.task]
    unknown = [m for m in suite.models if m not in task.models]
    if unknown:
        raise BenchmarkError(f"Unknown model(s) {unknown} for task {task.name!r}; it builds {', '.join(task.models)}.")
    refused = [m for m in resolve_methods(suite.methods) if m in task.not_applicable]
    if refused:
        reasons = "; ".join(f"{m}: {task.not_applicable[m]}" for m in refused)
        raise BenchmarkError(f"Method(s) {', '.join(refused)} do not apply to task {task.name!r} ({reasons}). "
                             "Leave them out of --methods.")
    if suite.pretrain is not None or suite.mixed_precision is not None or suite.compiled_methods:
        raise BenchmarkError(f"Task {task.name!r}: pretraining, mixed precision and torch.compile are measured on "
                             "image classification suites only; leave them unset.")
    if suite.image_size != task.input_size:
        raise BenchmarkError(f"Task {task.name!r} has samples of size {task.input_size} (image_size), got "
                             f"{suite.image_size}: its models are built for that size.")
    if not suite.max_train_samples or not suite.max_test_samples or suite.dataset is None:
        raise BenchmarkError(f"Task {task.name!r} composes or reads its samples: set max_train_samples and "
                             f"max_test_samples (got {suite.max_train_samples}, {suite.max_test_samples}) and dataset.")
