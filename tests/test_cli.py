"""The launcher: `hf-replacement train/evaluate/merge` on the embedded digits data, one and many processes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys

import pytest
import torch
from file_modes import expected_modes, modes_under
from processes import free_port, launch, run_processes, torchrun
from safetensors.torch import load_file, save_file
from tolerances import assert_fp32_close, reduction_length

from hf_replacement import ReplacementModel
from hf_replacement.commands.cli import main
from hf_replacement.commands.data import collate_fn, load_image_dataset, prepare_dataset, subsample

TINY = [
    "--model",
    "vit-mini",
    "--dataset",
    "digits",
    "--max-train-samples",
    "256",
    "--max-eval-samples",
    "64",
    "--batch-size",
    "32",
]


def run_cli(*args: str) -> None:
    assert main(list(args)) == 0


@pytest.mark.slow
def test_train_writes_a_loadable_checkpoint_and_results(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        run_cli("train", *TINY, "--epochs", "1", "--output-dir", str(out))
    printed = capsys.readouterr().out
    # One process: the save location said once (in the summary), and no log line tagged with a rank.
    assert (printed + caplog.text).count(str(out)) == 1, printed + caplog.text
    assert caplog.records and not [record for record in caplog.records if "[RANK" in record.getMessage()]
    results = json.loads((out / "results.json").read_text())
    assert results["replaced_blocks"] == {"3": "vit.layers.3"} or results["replaced_blocks"] == {3: "vit.layers.3"}
    assert results["updates"] == 8 and results["num_processes"] == 1 and results["mixed_precision"] == "no"
    assert results["trainable_params"] < results["total_params_unreplaced"]
    assert f"accuracy: {results['accuracy']:.4f}" in printed and str(out) in printed

    model = ReplacementModel.from_pretrained(out)
    assert model.get_nb_trainable_parameters()[0] == results["trainable_params"]
    run_cli("evaluate", str(out), "--max-eval-samples", "64")
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(results["accuracy"])

    run_cli("merge", str(out), str(tmp_path / "merged"))
    capsys.readouterr()
    run_cli("evaluate", str(tmp_path / "merged"), "--max-eval-samples", "64")
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(results["accuracy"])


def test_the_launcher_logs_a_rank_only_across_processes(caplog, monkeypatch):
    from accelerate.state import PartialState

    from hf_replacement.commands.logs import get_logger

    PartialState()  # what train() has made before it logs
    logger = get_logger("hf_replacement.test")
    with caplog.at_level(logging.INFO, logger="hf_replacement.test"):
        logger.info("one process", main_process_only=True)
        monkeypatch.setitem(PartialState._shared_state, "num_processes", 2)
        logger.info("two processes", main_process_only=True)
    assert [record.getMessage() for record in caplog.records] == ["one process", "[RANK 0] two processes"]
    assert caplog.records[0].funcName == "test_the_launcher_logs_a_rank_only_across_processes"


def test_baseline_trains_the_plain_model(tmp_path):
    previous_umask = os.umask(0o027)  # not the usual 022: the modes follow the umask, whichever it is
    try:
        run_cli("train", *TINY, "--epochs", "0.25", "--baseline", "--output-dir", str(tmp_path / "run"))
    finally:
        os.umask(previous_umask)
    # Transformers saves a plain model's weights 0600: the launcher gives them the modes of the rest.
    assert modes_under(tmp_path / "run") == expected_modes(tmp_path / "run", 0o027)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "baseline" and results["replaced_blocks"] == {}
    assert results["trainable_params"] == results["total_params"] == results["total_params_unreplaced"]
    assert not (tmp_path / "run" / "replacement_config.json").exists()


def assert_resume_is_exact(tmp_path, checkpointing_steps: int) -> None:
    """Train straight, then again from the straight run's first checkpoint: the final weights are equal."""
    common = [*TINY, "--epochs", "2", "--checkpointing-steps", str(checkpointing_steps)]
    run_cli("train", *common, "--output-dir", str(tmp_path / "straight"))
    checkpoint = tmp_path / "straight" / f"checkpoint-{checkpointing_steps}"
    run_cli("train", *common, "--output-dir", str(tmp_path / "resumed"), "--resume-from", str(checkpoint))
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    assert_resume_is_exact(tmp_path, checkpointing_steps=6)


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_other_settings_or_mixed_saves(tmp_path, capsys):
    common = [*TINY, "--max-train-samples", "64", "--epochs", "2", "--checkpointing-steps", "2"]
    run_cli("train", *common, "--output-dir", str(tmp_path / "run"))
    checkpoint = tmp_path / "run" / "checkpoint-2"

    def resume_error(*extra: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(
                ["train", *common, *extra, "--output-dir", str(tmp_path / "resumed"), "--resume-from", str(checkpoint)]
            )
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert "Traceback" not in error
        return error

    assert "saved by a run with other settings (baseline: False there, True now" in resume_error("--baseline")
    assert "coefficient_granularity" in resume_error("--coefficient-granularity", "channel")
    weights = load_file(checkpoint / "model.safetensors")
    weights["replacement_coefficients.3"] += 1  # as if another run had replaced the weights file
    save_file(weights, checkpoint / "model.safetensors")
    assert "the checkpoint mixes two saves" in resume_error()


@pytest.mark.slow
def test_resume_mid_epoch_with_dropout_continues_exactly(tmp_path, monkeypatch):
    """Dropout draws from the global RNG: the resumed loader must not draw from it where the straight run did not."""
    import hf_replacement.commands.train as launcher
    from hf_replacement.commands.presets import build_preset_model

    def with_dropout(*args, **kwargs):
        model = build_preset_model(*args, **kwargs)
        dropouts = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
        assert dropouts
        for module in dropouts:
            module.p = 0.1
        return model

    monkeypatch.setattr(launcher, "build_preset_model", with_dropout)
    assert_resume_is_exact(tmp_path, checkpointing_steps=5)  # 8 updates an epoch: update 5 is mid-epoch


@pytest.mark.slow
def test_bf16_mixed_precision_keeps_fp32_coefficients(tmp_path):
    run_cli(
        "train",
        *TINY,
        "--max-train-samples",
        "64",
        "--epochs",
        "1",
        "--mixed-precision",
        "bf16",
        "--output-dir",
        str(tmp_path),
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["mixed_precision"] == "bf16"
    coefficients = load_file(tmp_path / "model.safetensors")["replacement_coefficients.3"]
    assert coefficients.dtype == torch.float32 and not torch.equal(coefficients, torch.full((2, 1), 0.5))


def test_a_bf16_run_leaves_the_callers_next_accelerator_in_fp32(tmp_path):
    """Accelerate's state is process-wide: a notebook's own Accelerator after a bf16 run would otherwise
    autocast its model in bf16 without a word."""
    from accelerate import Accelerator

    run_cli("train", *TINY, "--max-train-samples", "64", "--epochs", "1", "--mixed-precision", "bf16",
            "--output-dir", str(tmp_path))  # fmt: skip
    assert Accelerator(cpu=True).mixed_precision == "no"


BAD_FLAGS = [
    (["train", "--epochs", "0"], "argument --epochs: 0.0 must be a finite number > 0"),
    (["train", "--epochs", "inf"], "argument --epochs: inf must be a finite number > 0"),
    (["train", "--lr", "inf"], "argument --lr: inf must be a finite number > 0"),
    (["train", "--lr", "nan"], "argument --lr: nan must be a finite number > 0"),
    (["train", "--weight-decay", "nan"], "argument --weight-decay: nan must be a finite number >= 0"),
    (
        ["train", "--max-train-samples", "10"],
        "no training batch: 10 training images, but one update takes --batch-size 64",
    ),
    (
        ["train", "--batch-size", "2000"],
        r"no training batch: \d+ training images, but one update takes --batch-size 2000",
    ),
    (["train", "--mixed-precision", "fp8"], "argument --mixed-precision: invalid choice: 'fp8'"),
    (["train", "--batch-size", "x"], "argument --batch-size: 'x' is not an integer"),
    (["train", "--replaced-blocks", "3,x"], "is not a comma-separated list of block indices"),
    (["train", "--baseline", "--replace-interval", "3"], "not allowed with argument"),
    (["train", "--coefficient-granularity", "layer"], "invalid choice: 'layer'"),
    (["train", "--model", "vit-huge"], "--model 'vit-huge' is not a preset, a local directory or a Hub id"),
    (
        ["train", "--replace-interval", "100", "--max-train-samples", "64"],
        "replace_interval=100 selects no block of this 8-block model",
    ),
    (
        ["train", "--replaced-blocks", "0", "--max-train-samples", "64"],
        r"replaced_blocks=\[0\] has \[0\] outside the valid range 1..6",
    ),
    (["train", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "apt-get install dataset-fashion-mnist"),
    (["evaluate", "/nonexistent/run"], "is not a checkpoint directory"),
    (["train", *TINY, "--image-size", "1"], "image size 1 is too small for preset 'vit-mini'"),
    (
        ["train", *TINY[2:], "--model", "/nonexistent/model-dir/x"],
        "--model /nonexistent/model-dir/x: its config could not be loaded",
    ),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train", *TINY, "--fsdp"], "--fsdp shards the model across the processes of a distributed launch"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_input_is_one_clear_error(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *(["--output-dir", str(tmp_path)] if argv[0] == "train" else [])])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert __import__("re").search(message, error), error
    assert "Traceback" not in error


def test_a_hub_model_offline_is_one_line(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY[2:], "--model", "google/vit-base-patch16-224", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--model google/vit-base-patch16-224: its config could not be loaded" in error and "Traceback" not in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast runs on CUDA")
def test_fp16_without_a_gpu_is_refused_not_recorded(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--mixed-precision", "fp16", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--mixed-precision fp16 needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_output_dir_that_is_a_file_fails_before_training(tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("not a directory")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--output-dir", str(target)])
    assert exit_info.value.code == 2
    assert "is a file, not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_divergence_stops_the_run_and_keeps_earlier_checkpoints(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "train",
                *TINY,
                "--epochs",
                "4",
                "--lr",
                "1e12",
                "--checkpointing-steps",
                "1",
                "--output-dir",
                str(tmp_path),
            ]
        )
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "the run diverged" in error and "Traceback" not in error
    update = int(__import__("re").search(r"at update (\d+)", error).group(1))
    assert update >= 2  # a first update with a finite loss, then NaN/inf
    last = load_file(tmp_path / f"checkpoint-{update - 1}" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in last.values())
    assert not (tmp_path / f"checkpoint-{update}").exists()
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "results.json").exists()


@pytest.fixture(scope="module")
def trained_and_merged(tmp_path_factory):
    """A tiny RepL run and its merged model, for the loading tests to damage copies of."""
    root = tmp_path_factory.mktemp("trained")
    run_cli("train", *TINY, "--max-train-samples", "64", "--epochs", "1", "--output-dir", str(root / "repl"))
    run_cli("merge", str(root / "repl"), str(root / "merged"))
    return root


def _evaluate_error(directory, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(directory), "--max-eval-samples", "32"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return error


@pytest.mark.slow
def test_the_merged_model_serves_with_a_pipeline_at_the_evaluated_accuracy(tmp_path):
    """Digits are gray 8x8 images: trained as RGB, the merged model and its saved image processor serve
    `pipeline(model=DIR)` on the test split's PIL images with the launcher's own predictions."""
    from transformers import pipeline

    out, merged = tmp_path / "repl", tmp_path / "merged"
    run_cli("train", *TINY, "--epochs", "0.25", "--output-dir", str(out))
    run_cli("merge", str(out), str(merged))
    assert (out / "preprocessor_config.json").read_bytes() == (merged / "preprocessor_config.json").read_bytes()
    results = json.loads((out / "results.json").read_text())
    raw = subsample(load_image_dataset("digits", seed=0), None, 64, seed=0)  # the run's evaluation images
    images = [example["image"] for example in raw["test"]]
    assert {image.mode for image in images} == {"L"}

    classify = pipeline("image-classification", model=str(merged), top_k=1, device="cpu")
    served = [top[0] for top in classify(images)]
    names = raw["test"].features["label"].names
    accuracy = sum(answer["label"] == names[label] for answer, label in zip(served, raw["test"]["label"])) / 64
    assert accuracy == results["accuracy"]
    # Image by image: the label and probability the RepL model gives the launcher's evaluation inputs.
    batch = collate_fn(list(prepare_dataset(raw, 8, 3)["test"]))
    repl_model = ReplacementModel.from_pretrained(out)
    with torch.no_grad():
        probabilities = repl_model(pixel_values=batch["pixel_values"]).logits.softmax(-1)
    assert [answer["label"] for answer in served] == [names[index] for index in probabilities.argmax(-1)]
    scores = torch.tensor([answer["score"] for answer in served])
    # The pipeline runs the merged model image by image: the network's rounding, at the scale of a probability.
    assert_fp32_close(scores, probabilities.max(-1).values, reduction_length(repl_model), 1.0)
    assert scores.std() > 1e-3  # the answers depend on the image


@pytest.mark.slow
def test_training_goes_on_from_a_merged_model(trained_and_merged, tmp_path, capsys):
    """`--model MERGED_DIR` reads the saved image processor, or without one (merged by an earlier version)
    normalises as the launcher did then; a vanishing learning rate keeps the merged model's accuracy."""
    merged = trained_and_merged / "merged"
    run_cli("evaluate", str(merged), "--max-eval-samples", "64")
    evaluated = json.loads(capsys.readouterr().out)["accuracy"]
    without_processor = tmp_path / "merged-earlier"
    shutil.copytree(merged, without_processor)
    (without_processor / "preprocessor_config.json").unlink()
    for model in (merged, without_processor):
        out = tmp_path / f"from-{model.name}"
        run_cli("train", *TINY[2:], "--model", str(model), "--baseline", "--lr", "1e-12", "--weight-decay", "0",
                "--epochs", "0.25", "--output-dir", str(out))  # fmt: skip
        assert json.loads((out / "results.json").read_text())["accuracy"] == evaluated
        assert (out / "preprocessor_config.json").read_text() == (merged / "preprocessor_config.json").read_text()


def test_merge_into_a_non_empty_directory_is_one_line(trained_and_merged, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(trained_and_merged / "repl"), str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "exists and is not empty; choose a new output directory" in error and "Traceback" not in error
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.slow
def test_a_failed_hub_push_is_one_line_and_keeps_the_saved_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--epochs", "0.25", "--push-to-hub", "--hub-model-id", "user/run",
              "--output-dir", str(tmp_path)])  # fmt: skip
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "could not connect to http://127.0.0.1" in error and "Traceback" not in error
    assert ReplacementModel.from_pretrained(tmp_path).replaced_blocks == {3: "vit.layers.3"}


def test_training_from_a_repl_checkpoint_names_merge(trained_and_merged, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY[2:], "--model", str(trained_and_merged / "repl"), "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "is a RepL checkpoint: write it as a plain Transformers model with `hf-replacement merge" in error


def test_evaluate_refuses_a_repl_checkpoint_without_its_config(trained_and_merged, tmp_path, capsys):
    damaged = tmp_path / "repl"
    shutil.copytree(trained_and_merged / "repl", damaged)
    (damaged / "replacement_config.json").unlink()
    assert "holds a RepL checkpoint but no replacement_config.json" in _evaluate_error(damaged, capsys)


def test_evaluate_refuses_a_model_with_missing_weights(trained_and_merged, tmp_path, capsys):
    damaged = tmp_path / "merged"
    shutil.copytree(trained_and_merged / "merged", damaged)
    weights = load_file(damaged / "model.safetensors")
    del weights[next(key for key in sorted(weights) if not key.startswith("classifier"))]
    save_file(weights, damaged / "model.safetensors")
    assert "do not fit the model its config.json describes" in _evaluate_error(damaged, capsys)


def test_evaluate_never_unpickles_a_bin_checkpoint(trained_and_merged, tmp_path, capsys):
    damaged = tmp_path / "merged"
    shutil.copytree(trained_and_merged / "merged", damaged)
    torch.save(load_file(damaged / "model.safetensors"), damaged / "pytorch_model.bin")
    (damaged / "model.safetensors").unlink()
    assert "Only safetensors weights are loaded" in _evaluate_error(damaged, capsys)


def test_dataset_without_labels(tmp_path, capsys):
    import datasets
    import numpy as np

    images = [np.zeros((8, 8), dtype=np.uint8)] * 4
    datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image()).save_to_disk(
        str(tmp_path / "data")
    )
    with pytest.raises(SystemExit):
        main(["train", "--dataset", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run")])
    assert "label" in capsys.readouterr().err


DISTRIBUTED_ARGS = [*TINY, "--epochs", "1", "--lr", "3e-3"]


def _compare_with_single_process(tmp_path, distributed_dir, *extra: str) -> None:
    run_cli("train", *DISTRIBUTED_ARGS, *extra, "--output-dir", str(tmp_path / "single"))
    single = load_file(tmp_path / "single" / "model.safetensors")
    multi = load_file(distributed_dir / "model.safetensors")
    results = json.loads((distributed_dir / "results.json").read_text())
    assert results["num_processes"] == 2
    # AdamW divides by the gradient's magnitude, so where a gradient is ~0 (a key bias's is exactly
    # zero: softmax ignores a shift of every score) it turns summation-order rounding into steps of
    # size lr. 8 updates at lr 3e-3 move a weight by up to 2.4e-2; a wrong data split or LR schedule
    # moved weights apart by 3e-3 to 7e-3 (measured), rounding by under 1e-4.
    for key in single:
        torch.testing.assert_close(multi[key], single[key], rtol=0, atol=2e-4, msg=key)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    half_batch = [a if a != "32" else "16" for a in DISTRIBUTED_ARGS]
    command = torchrun(
        "-m", "hf_replacement.commands.cli", "train", *half_batch, "--output-dir", str(tmp_path / "ddp"),
        "--checkpointing-steps", "4",
    )  # fmt: skip
    launch([command], tmp_path)
    _compare_with_single_process(tmp_path, tmp_path / "ddp")


@pytest.mark.slow
def test_simulated_two_node_run(tmp_path):
    half_batch = [a if a != "32" else "16" for a in DISTRIBUTED_ARGS]
    port = str(free_port())
    commands = [
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_machines",
            "2",
            "--machine_rank",
            str(rank),
            "--num_processes",
            "2",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "-m",
            "hf_replacement.commands.cli",
            "train",
            *half_batch,
            "--output-dir",
            str(tmp_path / "nodes"),
        ]
        for rank in (0, 1)
    ]
    launch(commands, tmp_path)
    _compare_with_single_process(tmp_path, tmp_path / "nodes")


@pytest.mark.slow
def test_divergence_stops_every_process_of_a_distributed_run(tmp_path):
    """Both processes see the non-finite loss (reduced across them) and exit with the error: none waits forever."""
    command = torchrun("-m", "hf_replacement.commands.cli", "train", *TINY, "--batch-size", "16", "--epochs", "4",
                       "--lr", "1e12", "--output-dir", str(tmp_path / "ddp"))  # fmt: skip
    (finished,) = run_processes([command], tmp_path)
    assert finished.returncode != 0
    assert finished.stdout.count("the run diverged") == 2, finished.stdout[-5000:]
    assert not (tmp_path / "ddp" / "model.safetensors").exists()


def _torchrun_train(*args: str) -> list[str]:
    return torchrun("-m", "hf_replacement.commands.cli", "train", *args)


FSDP_ARGS = [*(a if a != "32" else "16" for a in DISTRIBUTED_ARGS), "--fsdp"]  # the same global batch


@pytest.mark.slow
def test_fsdp_vit_equals_one_process_and_resumes_exactly(tmp_path):
    """--fsdp over 2 processes ends with one process's weights and coefficients; its checkpoint resumes exactly."""
    straight, resumed = tmp_path / "fsdp", tmp_path / "resumed"
    launch([_torchrun_train(*FSDP_ARGS, "--checkpointing-steps", "4", "--output-dir", str(straight))], tmp_path)
    _compare_with_single_process(tmp_path, straight)
    checkpoint = straight / "checkpoint-4"
    launch([_torchrun_train(*FSDP_ARGS, "--output-dir", str(resumed), "--resume-from", str(checkpoint))], tmp_path)
    expected, actual = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


@pytest.mark.slow
def test_fsdp_convnext_fusing_across_a_stage_boundary_equals_one_process_loads_and_merges(tmp_path, capsys):
    from transformers import AutoModelForImageClassification

    run = tmp_path / "fsdp"
    launch([_torchrun_train(*FSDP_ARGS, "--model", "convnext-mini", "--output-dir", str(run))], tmp_path)
    _compare_with_single_process(tmp_path, run, "--model", "convnext-mini")
    results = json.loads((run / "results.json").read_text())
    saved = load_file(run / "model.safetensors")
    # blocks 3 and 7 fuse the last block of one stage with the first of the next (other widths)
    stages = "convnext.encoder.stages"
    assert results["replaced_blocks"] == {"3": f"{stages}.1.layers.1", "7": f"{stages}.2.layers.3"}
    assert results["coefficients"]["replacement/b/block_7"] == saved["replacement_coefficients.7"][1, 0].item()

    model = ReplacementModel.from_pretrained(run)
    run_cli("merge", str(run), str(tmp_path / "merged"))
    capsys.readouterr()
    merged = AutoModelForImageClassification.from_pretrained(tmp_path / "merged").eval()
    pixels = torch.randn(2, merged.config.num_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


@pytest.mark.slow
def test_fsdp_bf16_computes_in_bf16_and_keeps_fp32_weights(tmp_path, process_group):
    """FSDP's mixed precision (bf16 compute, fp32 shards): what is saved and reported is fp32. One rank, in process."""
    run_cli("train", *TINY, "--max-train-samples", "32", "--epochs", "1", "--fsdp", "--mixed-precision", "bf16",
            "--output-dir", str(tmp_path))  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    weights = load_file(tmp_path / "model.safetensors")
    assert results["mixed_precision"] == "bf16" and {w.dtype for w in weights.values()} == {torch.float32}
    a, b = weights["replacement_coefficients.3"][:, 0].tolist()
    assert results["coefficients"] == {"replacement/a/block_3": a, "replacement/b/block_3": b}
    assert torch.tensor([a, b], dtype=torch.bfloat16).float().tolist() != [a, b]  # not bf16 values


@pytest.mark.parametrize(
    "environment, message",
    [
        ({"ACCELERATE_USE_FSDP": "true"}, "launch without it and pass --fsdp to hf-replacement train"),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            "DeepSpeed ZeRO-3 partitions the parameters per module",
        ),
    ],
    ids=["accelerate-fsdp", "deepspeed-zero3"],
)
def test_sharding_a_repl_model_cannot_train_under_is_refused(environment, message, tmp_path, capsys, monkeypatch):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
