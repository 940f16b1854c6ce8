"""The launcher: `hf-replacement train/evaluate/merge` on the embedded digits data, one and many processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hf_replacement import ReplacementModel
from hf_replacement.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "vit-mini", "--dataset", "digits", "--max-train-samples", "256", "--max-eval-samples", "64", "--batch-size", "32"]


def run_cli(*args: str) -> None:
    assert main(list(args)) == 0


def test_train_writes_a_loadable_checkpoint_and_results(tmp_path, capsys):
    out = tmp_path / "run"
    run_cli("train", *TINY, "--epochs", "1", "--output-dir", str(out))
    printed = capsys.readouterr().out
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


def test_baseline_trains_the_plain_model(tmp_path):
    run_cli("train", *TINY, "--epochs", "0.25", "--baseline", "--output-dir", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["method"] == "baseline" and results["replaced_blocks"] == {}
    assert results["trainable_params"] == results["total_params"] == results["total_params_unreplaced"]
    assert not (tmp_path / "replacement_config.json").exists()


def test_resume_continues_exactly(tmp_path):
    common = [*TINY, "--epochs", "2", "--checkpointing-steps", "6"]
    run_cli("train", *common, "--output-dir", str(tmp_path / "straight"))
    run_cli("train", *common, "--output-dir", str(tmp_path / "resumed"), "--resume-from", str(tmp_path / "straight" / "checkpoint-6"))
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_bf16_mixed_precision_keeps_fp32_coefficients(tmp_path):
    run_cli("train", *TINY, "--max-train-samples", "64", "--epochs", "1", "--mixed-precision", "bf16", "--output-dir", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["mixed_precision"] == "bf16"
    coefficients = load_file(tmp_path / "model.safetensors")["replacement_coefficients.3"]
    assert coefficients.dtype == torch.float32 and not torch.equal(coefficients, torch.full((2, 1), 0.5))


BAD_FLAGS = [
    (["train", "--epochs", "0"], "argument --epochs: 0.0 must be > 0"),
    (["train", "--mixed-precision", "fp8"], "argument --mixed-precision: invalid choice: 'fp8'"),
    (["train", "--batch-size", "x"], "argument --batch-size: 'x' is not an integer"),
    (["train", "--replaced-blocks", "3,x"], "is not a comma-separated list of block indices"),
    (["train", "--baseline", "--replace-interval", "3"], "not allowed with argument"),
    (["train", "--coefficient-granularity", "layer"], "invalid choice: 'layer'"),
    (["train", "--model", "vit-huge"], "--model 'vit-huge' is not a preset, a local directory or a Hub id"),
    (["train", "--replace-interval", "100", "--max-train-samples", "32"], "replace_interval=100 selects no block of this 8-block model"),
    (["train", "--replaced-blocks", "0", "--max-train-samples", "32"], r"replaced_blocks=\[0\] has \[0\] outside the valid range 1..6"),
    (["train", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "apt-get install dataset-fashion-mnist"),
    (["evaluate", "/nonexistent/run"], "is not a checkpoint directory"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_input_is_one_clear_error(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *(["--output-dir", str(tmp_path)] if argv[0] == "train" else [])])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert __import__("re").search(message, error), error
    assert "Traceback" not in error


def test_dataset_without_labels(tmp_path, capsys):
    import datasets
    import numpy as np

    images = [np.zeros((8, 8), dtype=np.uint8)] * 4
    datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "data"))
    with pytest.raises(SystemExit):
        main(["train", "--dataset", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run")])
    assert "label" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(commands: list[list[str]], tmp_path) -> None:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    processes = [subprocess.Popen(c, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]


DISTRIBUTED_ARGS = [*TINY, "--epochs", "1", "--lr", "3e-3"]


def _compare_with_single_process(tmp_path, distributed_dir) -> None:
    run_cli("train", *DISTRIBUTED_ARGS, "--output-dir", str(tmp_path / "single"))
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


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    half_batch = [a if a != "32" else "16" for a in DISTRIBUTED_ARGS]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
               "-m", "hf_replacement.cli", "train", *half_batch, "--output-dir", str(tmp_path / "ddp"), "--checkpointing-steps", "4"]
    _launch([command], tmp_path)
    _compare_with_single_process(tmp_path, tmp_path / "ddp")


def test_simulated_two_node_run(tmp_path):
    half_batch = [a if a != "32" else "16" for a in DISTRIBUTED_ARGS]
    port = str(_free_port())
    commands = [
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
         "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port,
         "-m", "hf_replacement.cli", "train", *half_batch, "--output-dir", str(tmp_path / "nodes")]
        for rank in (0, 1)
    ]
    _launch(commands, tmp_path)
    _compare_with_single_process(tmp_path, tmp_path / "nodes")
