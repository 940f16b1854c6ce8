"""The task suites (causal-lm, segmentation, detection): the metrics against hand-computed examples, the task layer
(data, batches, evaluation wiring, which methods apply to which task model and why the others cannot), the metric's
direction in the verdict, and (slow) each suite end to end with tiny settings, resumed."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from benchmarks.harness import BenchmarkError, get_suite, run_benchmark
from benchmarks.harness.baselines import StochasticDepthMixin, skippable_blocks
from benchmarks.harness.device import autocast
from benchmarks.harness.methods import METHODS, apply_method, build_method_model
from benchmarks.harness.report import _verdict as report_verdict
from benchmarks.harness.resume import LATER_FIELD_DEFAULTS, measurement_settings, training_settings
from benchmarks.harness.suites import validate_suite
from benchmarks.harness.task_metrics import average_precision, confusion_matrix, mean_average_precision, mean_iou
from benchmarks.harness.tasks import CLASSIFICATION, TASKS, task_of
from benchmarks.harness.training import clipped_backward
from benchmarks.harness.verdict import model_verdict, render_verdict, render_verdict_tally
from examples.task_data import byte_blocks, detection_samples, segmentation_samples, stdlib_text
from hf_replacement import find_blocks
from hf_replacement.commands.idx_files import FASHION_MNIST_DIR
from hf_replacement.commands.training_steps import make_optimizer, train_step
from tests.tolerances import assert_fp32_close

CPU = torch.device("cpu")
needs_fashion_mnist = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR), reason="canvases need Fashion-MNIST: apt-get install dataset-fashion-mnist"
)
TASK_SUITES = (
    "causal-lm", pytest.param("segmentation", marks=needs_fashion_mnist),
    pytest.param("detection", marks=needs_fashion_mnist),
)


def _small(name: str, train: int = 8, test: int = 4):
    """The suite with a few samples (the task and models unchanged)."""
    return dataclasses.replace(get_suite(name), max_train_samples=train, max_test_samples=test)


# --- the metrics, by hand ----------------------------------------------------------------------------------------

def test_mean_iou_of_a_hand_computed_confusion():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 1, 1, 1, 2, 0])
    confusion = confusion_matrix(predictions, labels, num_classes=4)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    # class 0: 1 / (2 + 2 - 1); class 1: 2 / (2 + 3 - 2); class 2: 1 / (2 + 1 - 1); class 3 absent from both.
    miou, ious = mean_iou(confusion)
    assert ious == [pytest.approx(1 / 3), pytest.approx(2 / 3), pytest.approx(1 / 2), None]
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    with pytest.raises(ValueError, match="empty"):
        mean_iou(torch.zeros(3, 3, dtype=torch.long))


def _boxes(*boxes):
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def test_map50_of_a_hand_computed_example_with_a_missed_box_and_a_duplicate():
    a1, b1, a2, b2 = [0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9], [0.1, 0.5, 0.4, 0.9], [0.6, 0.0, 0.9, 0.3]
    truths = [(torch.tensor([0, 1]), _boxes(a1, b1)), (torch.tensor([0, 1]), _boxes(a2, b2))]
    detections = [
        # image 0: a1 found (0.9), then found again (0.8: a duplicate, a false positive); b1 found (0.6).
        (torch.tensor([0.9, 0.8, 0.6]), torch.tensor([0, 0, 1]), _boxes(a1, a1, b1)),
        # image 1: a2 found (0.7); b2 missed; a detection of class 2, which no truth has (left out of the mean).
        (torch.tensor([0.7, 0.5]), torch.tensor([0, 2]), _boxes(a2, b2)),
    ]
    # Class 0 ranked: TP, FP, TP of 2 truths: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1; the envelope is 1 up
    # to recall 1/2 and 2/3 up to 1: AP = 1/2 * 1 + 1/2 * 2/3 = 5/6. Class 1: one TP of 2 truths: AP = 1/2.
    mean, per_class = mean_average_precision(detections, truths)
    assert per_class == {0: pytest.approx(5 / 6), 1: pytest.approx(1 / 2)}
    assert mean == pytest.approx((5 / 6 + 1 / 2) / 2)


def test_map50_needs_an_iou_above_one_half_and_counts_a_class_never_detected_as_zero():
    truth = [(torch.tensor([0, 1]), _boxes([0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]))]
    shifted = _boxes([0.2, 0.0, 0.6, 0.4])  # IoU with the truth: 0.08 / 0.24 = 1/3
    mean, per_class = mean_average_precision([(torch.tensor([0.9]), torch.tensor([0]), shifted)], truth)
    assert per_class == {0: 0.0, 1: 0.0} and mean == 0.0
    assert average_precision([], 3) == 0.0
    with pytest.raises(ValueError, match="images of detections"):
        mean_average_precision([], truth)


# --- the task layer ----------------------------------------------------------------------------------------------

@needs_fashion_mnist
def test_task_data_and_batches_are_the_examples_samples():
    segmentation = task_of(get_suite("segmentation"))
    data = segmentation.load(_small("segmentation", 3, 2), None)
    batch = segmentation.batch(data.train_x[:3], data.train_y[:3], CPU)
    samples = segmentation_samples(3, split="train", seed=0)
    assert torch.equal(batch["pixel_values"], torch.stack([s["pixel_values"] for s in samples]))
    assert torch.equal(batch["labels"], torch.stack([s["labels"] for s in samples]))

    detection = task_of(get_suite("detection"))
    data = detection.load(_small("detection", 3, 2), None)
    batch = detection.batch(data.train_x[:3], data.train_y[:3], CPU)
    for target, sample in zip(batch["labels"], detection_samples(3, split="train", seed=0)):
        assert torch.equal(target["class_labels"], sample["labels"]["class_labels"])
        assert torch.equal(target["boxes"], sample["labels"]["boxes"])
    held_out = torch.stack([s["pixel_values"] for s in detection_samples(2, split="test", seed=0)])
    assert torch.equal(detection.batch(data.test_x, data.test_y, CPU)["pixel_values"], held_out)

    text = task_of(get_suite("causal-lm"))
    data = text.load(_small("causal-lm", 5, 3), None)
    held_out = byte_blocks(stdlib_text("test", max_bytes=3 * 64), 64)
    assert torch.equal(data.test_x, torch.stack([block["input_ids"] for block in held_out]))
    assert text.batch(data.train_x[:2], data.train_y[:2], CPU)["labels"].equal(data.train_x[:2])


def test_perplexity_is_the_exponential_of_the_mean_byte_loss():
    task = task_of(get_suite("causal-lm"))
    data = task.load(_small("causal-lm", 1, 6), None)
    torch.manual_seed(0)
    model = build_method_model("bp", "gpt2-tiny", 0, 64, 3, seed=0).model
    with torch.no_grad():  # the reference: every predicted byte's log-probability, written out (no dropout)
        logits = model.eval()(input_ids=data.test_x).logits[:, :-1].double()
        log_probabilities = logits.log_softmax(-1).gather(-1, data.test_x[:, 1:, None])
    expected = math.exp(-float(log_probabilities.mean()))
    actual = task.evaluate(model.train(), data, CPU, autocast(CPU, None))
    assert model.training  # the training mode is restored
    assert_fp32_close(torch.tensor(math.log(actual)), torch.tensor(math.log(expected)), length=128 * 256)


class _Oracle(nn.Module):
    """Answers with the truth: one-hot logits of a segmentation's masks, or DETR outputs at the true boxes."""

    def __init__(self, truth: torch.Tensor, num_labels: int, detection: bool = False) -> None:
        super().__init__()
        self.truth, self.detection = truth, detection
        self.config = SimpleNamespace(num_labels=num_labels)
        self.calls = 0

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        truth = self.truth[self.calls:self.calls + len(pixel_values)]
        self.calls += len(pixel_values)
        if not self.detection:
            one_hot = nn.functional.one_hot(truth, self.config.num_labels)
            return SimpleNamespace(logits=one_hot.permute(0, 3, 1, 2).float())
        logits = nn.functional.one_hot(truth[..., 0].long(), self.config.num_labels + 1).float() * 10
        return SimpleNamespace(logits=logits, pred_boxes=truth[..., 1:])


def test_the_data_directory_is_read_for_canvases_and_refused_for_the_text(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"No Fashion-MNIST files in {tmp_path}"):
        task_of(get_suite("segmentation")).load(_small("segmentation"), str(tmp_path))
    with pytest.raises(BenchmarkError, match="standard library.*leave --data-dir out"):
        task_of(get_suite("causal-lm")).load(_small("causal-lm"), str(tmp_path))


@needs_fashion_mnist
def test_segmentation_and_detection_metrics_score_the_truth_as_perfect():
    segmentation = task_of(get_suite("segmentation"))
    data = segmentation.load(_small("segmentation", 1, 5), None)
    assert segmentation.evaluate(_Oracle(data.test_y, 11), data, CPU, autocast(CPU, None)) == 1.0
    detection = task_of(get_suite("detection"))
    data = detection.load(_small("detection", 1, 5), None)
    assert detection.evaluate(_Oracle(data.test_y, 10, detection=True), data, CPU, autocast(CPU, None)) == 1.0


def _one_step(model: nn.Module, task, data) -> float:
    batch = task.batch(data.train_x[:2], data.train_y[:2], CPU)
    return float(train_step(model.train(), make_optimizer(model, 1e-3, 0.0), batch))


@pytest.mark.parametrize("suite_name", TASK_SUITES)
def test_every_method_of_a_task_suite_applies_to_its_model_and_the_others_are_refused(suite_name):
    suite = get_suite(suite_name)
    task = task_of(suite)
    data = task.load(_small(suite_name, 2, 2), None)
    for method in suite.methods:
        built = build_method_model(method, suite.models[0], data.num_labels, suite.image_size, 3, seed=0)
        assert math.isfinite(_one_step(built.model, task, data)), method
        if METHODS[method].kind in ("repl", "drop"):
            assert built.affected_blocks, method
    assert set(task.not_applicable) == ({"repl-k4-half"} if suite_name == "causal-lm" else {"repl-k4-half", "narrow"})
    for method in task.not_applicable:  # each really fails on this model, and the suite refuses it up front
        with pytest.raises(Exception):  # noqa: B017 - the library's or the baseline's own error
            apply_method(METHODS[method], task.models[suite.models[0]]())
        with pytest.raises(BenchmarkError, match=f"{method}.*do not apply to task {task.name!r}"):
            get_suite(suite_name, methods=[*suite.methods, method])


def test_task_suites_refuse_other_models_sizes_and_classification_only_settings():
    with pytest.raises(BenchmarkError, match="Unknown model.*vit-mini.*builds gpt2-tiny"):
        get_suite("causal-lm", models=["vit-mini"])
    with pytest.raises(BenchmarkError, match="samples of size 56"):
        validate_suite(dataclasses.replace(get_suite("segmentation"), image_size=28))
    with pytest.raises(BenchmarkError, match="set max_train_samples"):
        validate_suite(dataclasses.replace(get_suite("detection"), max_train_samples=None))
    with pytest.raises(BenchmarkError, match="classification suites only"):
        validate_suite(dataclasses.replace(get_suite("detection"), mixed_precision="bf16"))
    with pytest.raises(BenchmarkError, match="Unknown task 'translation'"):
        validate_suite(dataclasses.replace(get_suite("quick"), task="translation"))


def test_classification_digests_are_unchanged_by_the_fields_the_tasks_added():
    quick = get_suite("quick")
    assert quick.task == CLASSIFICATION and quick.max_grad_norm is None
    for settings in (training_settings(quick, "vit-mini", "bp", 0, "d", CPU),
                     measurement_settings(quick, "vit-mini", ["bp"], CPU)):
        assert not set(LATER_FIELD_DEFAULTS) & set(settings)
    detection = training_settings(get_suite("detection"), "detr-tiny", "bp", 0, "d", CPU)
    assert detection["task"] == "object-detection" and detection["max_grad_norm"] == 0.1


def test_clipped_backward_scales_the_gradients_to_the_norm_as_a_whole():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    inputs = torch.randn(16, 8)
    model(inputs).pow(2).sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    norm = float(torch.cat([g.flatten() for g in reference]).norm())
    assert norm > 1  # the clipping factor, max_norm / (norm + 1e-6), is 0.1 / norm to fp32 rounding
    model.zero_grad()
    clipped_backward(model, 0.1)(model(inputs).pow(2).sum())
    for parameter, gradient in zip(model.parameters(), reference):
        assert_fp32_close(parameter.grad, gradient * (0.1 / norm), length=8 * 16)
    assert clipped_backward(model, None) is None


def test_narrow_gpt2_keeps_its_depth_and_heads_at_repl_k4s_trainable_count():
    repl = build_method_model("repl-k4", "gpt2-tiny", 0, 64, 3, seed=0)
    narrow = build_method_model("narrow", "gpt2-tiny", 0, 64, 3, seed=0)
    config = narrow.model.config
    assert (config.n_layer, config.n_head, config.n_inner) == (8, 4, None) and config.n_embd % 4 == 0
    target = sum(p.numel() for p in repl.model.parameters() if p.requires_grad)
    assert narrow.details["target_params"] == target
    assert narrow.details["params"] == sum(p.numel() for p in narrow.model.parameters())
    for width in (config.n_embd - 4, config.n_embd + 4):  # the nearest width: no neighbouring multiple of 4 is closer
        other = type(narrow.model)(config.__class__(**{**config.to_dict(), "n_embd": width}))
        assert abs(sum(p.numel() for p in other.parameters()) - target) >= abs(narrow.details["params"] - target)


def test_drop_renumbers_a_decoders_cache_indices_and_it_still_generates():
    built = build_method_model("drop-k4", "gpt2-tiny", 0, 64, 3, seed=0)
    model = built.model.eval()
    blocks = [block.module for block in find_blocks(model)]
    assert [block.attn.layer_idx for block in blocks] == list(range(7)) and model.config.n_layer == 7
    prompt = torch.tensor([list(b"def f(")])
    assert model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 10)


def test_stochastic_depth_on_detr_skips_only_blocks_that_keep_their_shape():
    plain = TASKS["object-detection"].models["detr-tiny"]()
    # Three of the backbone's five blocks open a stage with a projection shortcut (other channels, stride 2): they
    # always run. The other two and the 8 transformer layers can be skipped; drop-k4 drops 3 blocks, so each
    # is skipped with p = 3 / 10: the same expected number.
    assert len(find_blocks(plain)) == 13 and len(skippable_blocks(plain)) == 10
    built = build_method_model("sd", "detr-tiny", 10, 56, 3, seed=0)
    assert built.details["drop_probability"] == pytest.approx(3 / 10)
    assert sum(isinstance(module, StochasticDepthMixin) for module in built.model.modules()) == 10


def _entry(perplexities: list[float]) -> dict:
    return {"trainable_params": 1, "training_memory_mb": 1.0, "median_step_s": 1.0,
            "runs": [{"seed": s, "accuracy": p} for s, p in enumerate(perplexities)],
            "accuracy_mean": statistics.fmean(perplexities), "accuracy_std": statistics.stdev(perplexities)}


def test_a_lower_perplexity_wins_and_not_applicable_baselines_say_so():
    metric = TASKS["causal-lm"].metric
    methods = {"repl-k4": _entry([3.0, 3.1, 3.2]), "bp": _entry([4.0, 4.1, 4.2]), "drop-k4": _entry([2.0, 2.1, 2.2])}
    verdict = model_verdict(methods, metric)["equal or better accuracy (equal epochs)"]
    assert verdict["bp"] == "win (-1.000 ± 0.141)" and verdict["drop-k4"] == "lose (+1.000 ± 0.141)"
    for entry in methods.values():
        entry["accuracies"] = [run["accuracy"] for run in entry["runs"]]
    assert report_verdict(methods["repl-k4"], methods["bp"], "RepL", "bp", metric) == (
        "RepL beats bp (-1.000 perplexity, spread 0.141)")
    results = {"suite": {"task": "causal-lm"}, "models": {"gpt2-tiny": {"methods": methods}}}
    lines = render_verdict({"causal-lm": results})
    assert any("equal or better perplexity (equal epochs) | win (-1.000 ± 0.141) |" in line for line in lines)
    results = {"suite": {"task": "semantic-segmentation"}, "models": {"segformer-tiny": {"methods": methods}}}
    lines = render_verdict({"segmentation": results})  # narrow cannot apply to SegFormer: said so in every row
    assert any(line.startswith("| `segmentation` | segformer-tiny | equal or better mIoU (equal epochs) | lose")
               and line.endswith("| not applicable |") for line in lines)


def test_a_baseline_that_did_not_train_is_judged_for_cost_only():
    assert set(TASKS["object-detection"].untrainable) == {"sd"}
    methods = {"repl-k4": _entry([0.70, 0.71, 0.72]), "bp": _entry([0.72, 0.73, 0.74]), "sd": _entry([0.01, 0.02, 0.0])}
    methods["sd"]["trainable_params"] = 2  # sd trains the plain model's parameters: RepL has fewer
    results = {"suite": {"task": "object-detection"}, "models": {"detr-tiny": {"methods": methods}}}
    rows = {line.split(" | ")[2]: line for line in render_verdict({"detection": results})[2:]}
    sd_cell = 6  # | suite | model | claim | vs bp | vs drop-k4 | vs tie-k4 | vs sd | ...
    assert rows["equal or better mAP@0.5 (equal epochs)"].split(" | ")[sd_cell] == "did not train"
    assert rows["fewer trainable parameters"].split(" | ")[sd_cell].startswith("win (-50.0%)")
    tally = render_verdict_tally({"detection": results})
    accuracy = next(line for line in tally if line.startswith("| equal or better accuracy (equal epochs) |"))
    assert accuracy.split(" | ")[4] == "–"  # vs sd: nothing counted
    # The same numbers on a task where sd trains: RepL's mAP "wins" against it.
    results["suite"]["task"] = "semantic-segmentation"
    rows = {line.split(" | ")[2]: line for line in render_verdict({"segmentation": results})[2:]}
    assert rows["equal or better mIoU (equal epochs)"].split(" | ")[sd_cell].startswith("win")


@pytest.mark.slow
@pytest.mark.parametrize("suite_name", TASK_SUITES)
def test_task_suite_runs_end_to_end_and_resumes(suite_name, tmp_path):
    suite = dataclasses.replace(
        get_suite(suite_name, seeds=2, epochs=2, batch_size=4), max_train_samples=8, max_test_samples=4,
        timing_warmup_steps=1, timing_rounds=1, timing_steps_per_round=1, inference_batch_size=2,
        inference_rounds=1, inference_calls_per_round=1,
    )
    results = run_benchmark(suite, tmp_path)
    methods = results["models"][suite.models[0]]["methods"]
    assert list(methods) == list(suite.methods) and results["trained_methods"] == list(suite.trained_methods())
    for method in suite.trained_methods():
        runs = methods[method]["runs"]
        assert len(runs) == 2 and all(len(run["accuracy_per_epoch"]) == 2 for run in runs)
        assert all(math.isfinite(run["accuracy"]) for run in runs)
    task = task_of(suite)
    report = (tmp_path / "results.md").read_text()
    assert f"{task.metric.name} (mean ± std)" in report and "Not applicable to this task's model" in report
    assert f"equal or better {task.metric.name} (equal epochs)" in report
    again = run_benchmark(suite, tmp_path)  # every piece finished: all reused, the same numbers
    assert len(again["reused_from_earlier_runs"]) == 1 + 2 * len(suite.trained_methods())
    assert again["models"][suite.models[0]]["methods"]["bp"]["accuracies"] == methods["bp"]["accuracies"]


def test_sd_ablation_restricts_skipping_to_the_named_blocks():
    from benchmarks.sd_ablation import VARIANTS, restrict_stochastic_depth

    model = TASKS["object-detection"].models["detr-tiny"]()
    chosen = restrict_stochastic_depth(model, VARIANTS["decoder layers 1-3"], 0.3)
    assert chosen == [f"model.decoder.layers.{i}" for i in (1, 2, 3)]
    probabilities = {
        name: module.drop_probability for name, module in model.named_modules()
        if isinstance(module, StochasticDepthMixin)
    }
    assert len(probabilities) == 10  # the backbone's two blocks, 4 encoder and 4 decoder layers
    assert {name for name, p in probabilities.items() if p == 0.3} == set(chosen)
    assert all(p == 0.0 for name, p in probabilities.items() if name not in chosen)
    assert len(restrict_stochastic_depth(model, VARIANTS["sd (every block)"], 0.3)) == 10
    with pytest.raises(BenchmarkError, match=r"No skippable block of DetrForObjectDetection starts with "
                                             r"\('nope',\); its skippable blocks are model\.backbone"):
        restrict_stochastic_depth(model, ("nope",), 0.3)


@pytest.mark.slow
def test_sd_ablation_script_writes_every_variant_and_seed(tmp_path):
    from benchmarks import sd_ablation

    variants = ["bp", "control (every block, p = 1e-9)", "decoder layer 0"]
    argv = ["--canvases", "8", "--test-canvases", "4", "--epochs", "1", "--seeds", "2", "--output-dir",
            str(tmp_path), "--variants", *variants]
    assert sd_ablation.main(argv) == 0
    results = json.loads((tmp_path / "sd_ablation.json").read_text())
    assert list(results["variants"]) == variants
    assert [[run["seed"] for run in runs] for runs in results["variants"].values()] == [[0, 1]] * 3
    bp, control, decoder = (results["variants"][v] for v in variants)
    assert [len(bp[0]["blocks"]), len(control[0]["blocks"]), decoder[0]["blocks"]] == [
        0, 10, ["model.decoder.layers.0"]]
    assert control[0]["drop_probability"] == 1e-9 and decoder[0]["drop_probability"] == pytest.approx(0.3)
    # The control differs from bp in rounding only: after one step on 8 canvases the losses agree closely.
    for seed in (0, 1):
        assert control[seed]["train_loss_per_epoch"][0] == pytest.approx(bp[seed]["train_loss_per_epoch"][0], rel=1e-3)
    assert "| decoder layer 0 | 1 | 0.3 |" in (tmp_path / "sd_ablation.md").read_text()
