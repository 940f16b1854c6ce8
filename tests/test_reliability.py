"""Bad input and faults, as the user meets them: `hf-replacement train/evaluate/merge` on the embedded digits.

Each case ends in one clear line (or a correct result, said), never a traceback or a silent wrong answer.
The in-process cases inject the fault where the operating system would raise it; the slow ones send real
signals and run concurrent processes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image as PILImage
from safetensors import SafetensorError
from safetensors.torch import load_file

import hf_replacement.checkpoint as checkpoint_module
from hf_replacement import ReplacementConfigError, ReplacementModel
from hf_replacement.commands.cli import main
from hf_replacement.commands.resume_check import apply_optimizer_changes
from hf_replacement.commands.run_lock import LOCK_NAME
from hf_replacement.commands.training_state import check_resumable
from hf_replacement.commands.training_steps import DivergenceMonitor, make_scheduler
from hf_replacement.config import FORMAT_VERSION

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "vit-mini", "--dataset", "digits", "--max-eval-samples", "32", "--batch-size", "32"]
# 64 images, batch 32: 2 updates an epoch, 4 in all; checkpoint-2 and checkpoint-4 (the last update).
RUN = [*TINY, "--max-train-samples", "64", "--epochs", "2", "--checkpointing-steps", "2"]
LEFTOVER = re.compile(r"\.(tmp|backup)$")
# What safetensors raises when the disk fills up while it writes (its Rust error, as the issue saw it).
DISK_FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def cli_error(argv: list[str], capsys, code: int = 2) -> str:
    """Run the command, expect exit `code` with one line on stderr and no traceback; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    error = capsys.readouterr().err
    assert "Traceback" not in error
    lines = [line for line in error.splitlines() if line.startswith("hf-replacement")]
    assert len(lines) == 1, error
    return lines[0]


def leftovers(directory) -> list[str]:
    return [os.path.join(root, name) for root, dirs, files in os.walk(directory) for name in dirs + files
            if LEFTOVER.search(name)]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny RepL run with checkpoints at updates 2 and 4 (the last)."""
    root = tmp_path_factory.mktemp("run") / "A"
    assert main(["train", *RUN, "--output-dir", str(root)]) == 0
    return root


# --- 1. evaluate on a data set with other classes ------------------------------------------------------------


def _image_folder(directory, classes: int) -> str:
    for label in range(classes):
        os.makedirs(directory / f"class{label}")
        for index in range(4):
            PILImage.new("RGB", (8, 8), (20 * label, index, 0)).save(directory / f"class{label}" / f"{index}.png")
    return str(directory)


@pytest.mark.parametrize("classes", [3, 12])
def test_evaluate_refuses_a_data_set_with_another_number_of_classes(run_dir, tmp_path, capsys, classes):
    folder = _image_folder(tmp_path / "images", classes)
    error = cli_error(["evaluate", str(run_dir), "--dataset", folder], capsys)
    assert f"predicts 10 classes, but --dataset {folder} has {classes}" in error


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="needs Debian's Fashion-MNIST")
def test_evaluate_refuses_a_data_set_whose_classes_are_named_otherwise(run_dir, capsys):
    error = cli_error(["evaluate", str(run_dir), "--dataset", "fashion-mnist", "--max-eval-samples", "32"], capsys)
    assert "name their classes differently (class 0: '0' in the model, 'T-shirt/top' in the data" in error


# --- 2. and 6. what a resume honours --------------------------------------------------------------------------

REFUSED_ON_RESUME = [
    (["--epochs", "1"], "--epochs 1.0 (the saved run: 2.0)"),  # issue item 6: already past the end
    (["--batch-size", "16"], "the global batch (--batch-size x processes x --gradient-accumulation-steps) 16"),
    (["--gradient-accumulation-steps", "2"], "--gradient-accumulation-steps 2 (the saved run: 1)"),
    (["--mixed-precision", "bf16"], "--mixed-precision bf16 (the saved run: no)"),
    (["--seed", "1"], "--seed 1 (the saved run: 0)"),
    (["--max-train-samples", "96"], "--max-train-samples 96 (the saved run: 64)"),
    (["--image-size", "16"], "--image-size 16 (the saved run: 8)"),
]


@pytest.mark.parametrize("flags, message", REFUSED_ON_RESUME, ids=[" ".join(f) for f, _ in REFUSED_ON_RESUME])
def test_resume_refuses_a_flag_the_checkpoint_fixes(run_dir, tmp_path, capsys, flags, message):
    argv = ["train", *RUN, *flags, "--output-dir", str(tmp_path), "--resume-from", str(run_dir / "checkpoint-2")]
    error = cli_error(argv, capsys)
    assert f"--resume-from {run_dir / 'checkpoint-2'} cannot honour " in error and message in error
    assert not (tmp_path / "results.json").exists()


def test_resume_applies_and_says_a_new_learning_rate_and_weight_decay(run_dir, tmp_path, caplog):
    checkpoint = str(run_dir / "checkpoint-2")
    changed = ["--lr", "0.5", "--weight-decay", "0.1"]
    with caplog.at_level(logging.WARNING):
        assert main(["train", *RUN, *changed, "--output-dir", str(tmp_path), "--resume-from", checkpoint]) == 0
    said = caplog.text
    assert f"--resume-from {checkpoint}: --lr 0.5 (the saved run: 0.001) is applied" in said
    assert "--weight-decay 0.1 (the saved run: 0.05) is applied" in said
    straight, resumed = load_file(run_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert any(not torch.equal(straight[key], resumed[key]) for key in straight)  # not dropped: the run changed


def test_a_new_learning_rate_continues_the_schedule_at_the_new_peak():
    """After the change, each update's rate is the one a run started with the new rate has at that update."""
    total, done = 40, 7

    def trained(lr: float):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=lr, weight_decay=0.05)
        scheduler = make_scheduler(optimizer, total, warmup_ratio=0.1)
        for _ in range(done):
            optimizer.step()
            scheduler.step()
        return optimizer, scheduler

    resumed, resumed_schedule = trained(1e-3)
    apply_optimizer_changes(resumed, resumed_schedule, {"lr": 0.5, "weight_decay": 0.1})
    reference, reference_schedule = trained(0.5)
    for _ in range(total - done):
        assert resumed.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"], rel=1e-12, abs=0)
        assert resumed_schedule.get_last_lr() == pytest.approx(reference_schedule.get_last_lr(), rel=1e-12)
        assert resumed.param_groups[0]["weight_decay"] == 0.1
        resumed.step()
        resumed_schedule.step()
        reference.step()
        reference_schedule.step()


def test_resuming_the_last_checkpoint_trains_nothing_and_says_so(run_dir, tmp_path, capsys):
    argv = ["train", *RUN, "--output-dir", str(tmp_path), "--resume-from", str(run_dir / "checkpoint-4")]
    assert main(argv) == 0
    assert "no update taken: the run had already reached its 4 updates" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["updates"] == 4


# --- 3. a RepL config that lost a key ------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["surrogate", "coefficient_granularity"])
def test_a_config_missing_a_key_is_refused_not_defaulted(run_dir, tmp_path, capsys, key):
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((damaged / "replacement_config.json").read_text())
    del config[key]
    (damaged / "replacement_config.json").write_text(json.dumps(config))
    for argv in (["evaluate", str(damaged)], ["merge", str(damaged), str(tmp_path / "merged")]):
        expected = f"lacks the key(s) ['{key}'], which format_version {FORMAT_VERSION} writes every time"
        assert expected in cli_error(argv, capsys)
    with pytest.raises(ReplacementConfigError, match=key):
        ReplacementModel.from_pretrained(damaged)


# --- 7. flags that were dropped, paths that ended in a traceback -----------------------------------------------

BAD_COMMANDS = [
    (["--replaced-blocks", "3", "--replace-interval", "4"], "--replace-interval: not allowed with argument --replaced"),
    (["--replace-interval", "4", "--replaced-blocks", "3"], "--replaced-blocks: not allowed with argument --replace"),
    (["--baseline", "--surrogate", "half"], "--baseline: not allowed with --surrogate"),
    (["--baseline", "--coefficient-init", "fit"], "--baseline: not allowed with --coefficient-init"),
    (["--baseline", "--replace-interval", "4"], "--baseline: not allowed with --replace-interval"),
    (["--baseline", "--detach-neighbors", "--surrogate", "block"], "not allowed with --detach-neighbors, --surrogate"),
]


@pytest.mark.parametrize("flags, message", BAD_COMMANDS, ids=[" ".join(f) for f, _ in BAD_COMMANDS])
def test_repl_flags_that_would_be_ignored_are_refused(flags, message, tmp_path, capsys):
    assert message in cli_error(["train", *TINY, *flags, "--output-dir", str(tmp_path)], capsys)
    assert os.listdir(tmp_path) == []  # refused before anything starts


def test_merge_into_an_existing_file_is_one_line(run_dir, tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_text("keep me")
    assert "is a file, not a directory" in cli_error(["merge", str(run_dir), str(target)], capsys)
    assert target.read_text() == "keep me"


def test_a_missing_base_config_is_named_not_the_guard(run_dir, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged, ignore=shutil.ignore_patterns("checkpoint-*"))
    os.remove(damaged / "base_config.json")
    error = cli_error(["evaluate", str(damaged)], capsys)
    assert f"{damaged / 'base_config.json'} is missing" in error and "config.json is not" not in error


# --- 4. one run per output directory ---------------------------------------------------------------------------

_HOLD_LOCK = (
    "import fcntl, sys, time; handle = open(sys.argv[1], 'a+'); fcntl.flock(handle, fcntl.LOCK_EX); "
    "handle.write('pid %d on test-host' % __import__('os').getpid()); handle.flush(); print('held', flush=True); "
    "time.sleep(600)"
)


def test_an_output_dir_in_use_is_refused_and_a_killed_owner_leaves_it_free(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(tmp_path / LOCK_NAME)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        error = cli_error(["train", *RUN, "--output-dir", str(tmp_path)], capsys)
        assert f"--output-dir {tmp_path} is in use by another hf-replacement train (pid {holder.pid} on test-host)" in (
            error
        )
    finally:
        holder.send_signal(signal.SIGKILL)  # as a crashed or killed run: the OS releases its lock
        holder.wait()
    assert main(["train", *RUN, "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "results.json").exists()


# --- 5. a full disk, a read-only directory, Ctrl-C --------------------------------------------------------------


def _fail_on_save(monkeypatch, failing_call: int, fault: BaseException) -> None:
    """The `failing_call`-th safetensors file written raises `fault`, as the disk or the user would."""
    real_save, calls = checkpoint_module.save_file, []

    def save_file(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == failing_call:
            raise fault
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)


# Each checkpoint writes two safetensors files (weights, training state): call 3 is checkpoint-4's weights.
@pytest.mark.parametrize(
    "fault, code, message",
    [
        (SafetensorError(DISK_FULL), 1, "error: could not save checkpoint-4 to {out} (No space left on device): "),
        (OSError(28, "No space left on device"), 1, "error: could not save checkpoint-4 to {out} (No space left"),
        (KeyboardInterrupt(), 130, "interrupted (Ctrl-C) while saving checkpoint-4: nothing of it was kept; "),
    ],
    ids=["safetensors-disk-full", "os-disk-full", "ctrl-c"],
)
def test_a_failed_or_interrupted_save_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, capsys, monkeypatch, fault, code, message
):
    out = tmp_path / "run"
    _fail_on_save(monkeypatch, 3, fault)
    error = cli_error(["train", *RUN, "--output-dir", str(out)], capsys, code=code)
    assert message.format(out=out) in error
    assert f"the last complete checkpoint, {out / 'checkpoint-2'}, is intact: go on with --resume-from" in error
    assert leftovers(out) == [] and not (out / "checkpoint-4").exists() and not (out / "results.json").exists()
    check_resumable(str(out / "checkpoint-2"), json.loads((out / "checkpoint-2" / "training_state.json").read_text())[
        "run"])  # fmt: skip


def test_a_failed_final_save_is_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _fail_on_save(monkeypatch, 5, SafetensorError(DISK_FULL))  # after both checkpoints: the final model
    error = cli_error(["train", *RUN, "--output-dir", str(out)], capsys, code=1)
    assert "could not save the final model" in error and f"{out / 'checkpoint-4'}, is intact" in error
    assert leftovers(out) == []


def test_ctrl_c_while_training_names_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    import hf_replacement.commands.train as launcher

    real_step, calls = launcher.train_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(launcher, "train_step", interrupted_step)
    error = cli_error(["train", *RUN, "--output-dir", str(tmp_path)], capsys, code=130)
    assert f"interrupted (Ctrl-C); the last complete checkpoint, {tmp_path / 'checkpoint-2'}, is intact" in error


@pytest.fixture
def reachable_tmp():
    """A temporary directory another user can reach (pytest's lies under a root-only directory)."""
    import pathlib
    import tempfile

    directory = pathlib.Path(tempfile.mkdtemp(prefix="hf-replacement-test-"))
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_a_read_only_directory_mid_save_is_one_line(reachable_tmp, capsys, monkeypatch):
    """The directory turns read-only while checkpoint-4's files are written: one line, naming what it kept."""
    out = reachable_tmp / "run"
    real_save, calls, dropped = checkpoint_module.save_file, [], []

    def save_then_lose_permission(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            dropped.append(_as_an_ordinary_user(out))
            os.chmod(out, 0o555)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", save_then_lose_permission)
    try:
        error = cli_error(["train", *RUN, "--output-dir", str(out)], capsys, code=1)
    finally:
        if dropped and dropped[0]:
            os.seteuid(0)
            os.setegid(0)
        os.chmod(out, 0o755)
    assert "could not save checkpoint-4" in error and "Permission denied" in error
    assert f"{out / 'checkpoint-2'}, is intact" in error
    left = [os.path.basename(path) for path in leftovers(out)]
    assert len(left) == 1 and left[0].startswith(".checkpoint-4.")  # the staging directory: out is read-only
    assert f"so {left[0]} could not be removed: the next run into it removes it" in error
    assert main(["train", *RUN, "--output-dir", str(out)]) == 0  # ... and the next run does
    assert leftovers(out) == []


def _as_an_ordinary_user(directory) -> bool:
    """Root writes into read-only directories: go on with the rights of `nobody`, the files theirs, as a user's
    run would have written them. True if the rights were given up (the caller takes them back)."""
    if os.geteuid() != 0:
        return False
    import pwd

    nobody = pwd.getpwnam("nobody")
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    os.setegid(nobody.pw_gid)
    os.seteuid(nobody.pw_uid)
    return True


@pytest.mark.slow
def test_a_real_ctrl_c_exits_130_with_one_line_and_a_resumable_checkpoint(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "hf_replacement.commands.cli", "train", *TINY, "--max-train-samples", "64",
               "--epochs", "200", "--checkpointing-steps", "1", "--output-dir", str(out)]  # fmt: skip
    # A suite started in the background inherits an ignored SIGINT from the shell: the run must not.
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True, env=_environment(),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-3").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 130, error
    assert "Traceback" not in error
    assert error.strip().splitlines()[-1].startswith("hf-replacement train: interrupted (Ctrl-C)")
    last = re.search(r"the last complete checkpoint, (\S+), is intact", error).group(1)
    check_resumable(last, json.loads(open(os.path.join(last, "training_state.json")).read())["run"])
    assert leftovers(out) == []


@pytest.mark.slow
def test_two_concurrent_runs_into_one_directory(tmp_path):
    """`hf-replacement train` twice into one --output-dir: the second is refused while the first runs (a long
    run, stopped with Ctrl-C once the second has answered, so the order cannot race), and the first goes on."""
    command = [sys.executable, "-m", "hf_replacement.commands.cli", "train", *RUN, "--epochs", "2000",
               "--output-dir", str(tmp_path)]  # fmt: skip
    first = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True, env=_environment(),
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        lock, deadline = tmp_path / LOCK_NAME, time.monotonic() + 120
        while not (lock.exists() and lock.stat().st_size) and time.monotonic() < deadline:  # the first owns it
            time.sleep(0.05)
        second = subprocess.run(command, cwd=REPO, stderr=subprocess.PIPE, text=True, env=_environment(), timeout=300)
        assert first.poll() is None, "the first run ended before the second answered: the test proves nothing"
    finally:
        first.send_signal(signal.SIGINT)
        _, first_error = first.communicate(timeout=120)
    assert second.returncode == 2 and f"is in use by another hf-replacement train (pid {first.pid} on" in second.stderr
    assert first.returncode == 130, first_error[-2000:]  # it went on training, untouched, until Ctrl-C


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}


# --- 8. divergence short of NaN --------------------------------------------------------------------------------


def test_divergence_monitor_reports_a_sustained_rise_with_its_numbers():
    monitor = DivergenceMonitor(factor=3.0, window=4, minimum_rise=1.0)
    losses = [2.0, 2.0, 2.0, 2.0, 9.0, 9.0, 9.0]  # updates 5, 6: means 3.75, 5.5; update 7: 7.25 > 3 x 2
    messages = [monitor.observe(loss, update) for update, loss in enumerate(losses, start=1)]
    assert messages[:6] == [None] * 6
    assert messages[6].startswith(
        "the training loss is diverging: its mean over updates 4-7 is 7.25, 3.6x its start (2 at the first update; "
        "the alarm is above 6)"
    )
    assert monitor.observe(50.0, 8) is None  # said once


@pytest.mark.parametrize(
    "losses",
    [
        [2.3] + [2.3 * 0.97**i for i in range(60)],  # training as it should
        [2.3, 2.0, 30.0, 25.0] + [1.5] * 40,  # a spike that recovers
        [0.01] + [0.01 + 0.5 * (i % 2) for i in range(60)],  # a start near zero, noise far above 3x it
    ],
    ids=["decreasing", "spike", "near-zero-start"],
)
def test_divergence_monitor_stays_quiet_on_healthy_runs(losses):
    monitor = DivergenceMonitor()
    assert all(monitor.observe(loss, update) is None for update, loss in enumerate(losses, start=1))


def test_a_loss_far_above_its_start_is_reported_or_stops_the_run(tmp_path, capsys, caplog):
    diverging = [*TINY, "--max-train-samples", "128", "--epochs", "8", "--lr", "1"]  # 32 updates
    with caplog.at_level(logging.WARNING):
        assert main(["train", *diverging, "--output-dir", str(tmp_path / "warned")]) == 0
    warning = re.search(r"loss is diverging: its mean over updates (\d+)-(\d+) is ([\d.e+]+), ", caplog.text)
    assert warning, caplog.text
    assert float(warning.group(3)) > 3 * 2.0  # an initial loss of ~ln(10) = 2.3
    recorded = json.loads((tmp_path / "warned" / "results.json").read_text())["divergence"]
    assert recorded.startswith(f"the training loss is diverging: its mean over updates {warning.group(1)}-")
    assert f"warning: {recorded}" in capsys.readouterr().out  # said again in the summary, where it is read
    error = cli_error(["train", *diverging, "--stop-on-divergence", "--output-dir", str(tmp_path / "stopped")],
                      capsys, code=1)  # fmt: skip
    assert f"is diverging: its mean over updates {warning.group(1)}-{warning.group(2)}" in error
    assert f"Stopped at update {warning.group(2)} (--stop-on-divergence)" in error
    assert not (tmp_path / "stopped" / "results.json").exists()


# --- the fault study (docs/reliability.md) ------------------------------------------------------------------------


@pytest.mark.slow
def test_the_fault_study_reproduces_from_the_checkout():
    """`python scripts/fault_study.py` as docs/reliability.md runs it (two quick categories, nothing rewritten):
    every input gets a clear outcome, and the table counts them."""
    categories = "train: flags,evaluate/merge/resume: damaged checkpoints"
    command = [sys.executable, "scripts/fault_study.py", "--categories", categories, "--no-write"]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=_environment(), timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in finished.stdout.splitlines() if line.startswith("| ")}  # fmt: skip
    # inputs tried, clear, silent, hang, traceback, other, temporary files left
    assert rows["train: flags"][0] == rows["train: flags"][1] == "35"
    assert rows["**all**"][2:] == ["0"] * 5 and int(rows["**all**"][0]) == int(rows["**all**"][1]) > 60
