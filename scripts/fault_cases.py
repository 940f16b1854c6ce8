"""The inputs of the fault study (`scripts/fault_study.py`), by category.

Each `Case` is what a user types (`argv`, relative to a finished reference run `where.run` with
checkpoints at updates 2 and 4, and a fresh directory `where.case`), what should come of it (`expect`:
"error", one clear line containing `says`; or "works", checked by `check`), and optionally a damage done
first (`prepare`), a fault active while it runs (`fault`) or its own way of running (`runner`: real
signals and concurrent processes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fault_running import Outcome, run_in_process, subprocess_environment
from PIL import Image as PILImage
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

TINY = ["--model", "vit-mini", "--dataset", "digits", "--max-eval-samples", "32", "--batch-size", "32"]
# 64 images, batch 32: 2 updates an epoch, 4 in all; checkpoint-2 and checkpoint-4 (the last update).
RUN = [*TINY, "--max-train-samples", "64", "--epochs", "2", "--checkpointing-steps", "2"]
WEIGHTS = "model.safetensors"
DISK_FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


@dataclasses.dataclass
class Where:
    run: Path  # the reference run (do not modify: copy it)
    case: Path  # this case's own empty directory


@dataclasses.dataclass
class Case:
    category: str
    what: str
    argv: Callable[[Where], list[str]] = lambda where: []
    expect: str = "error"  # "error" or "works"
    says: str | None = None  # a phrase the error line must contain
    exit_code: int | None = None
    check: Callable[[Where, Any], str | None] | None = None  # for "works": None if right, else what is wrong
    prepare: Callable[[Where], None] | None = None
    fault: Callable[[Where], contextlib.AbstractContextManager] | None = None
    runner: Callable[[Where, int], Any] | None = None
    # The fault itself keeps the process from removing its temporary files (a directory turned read-only).
    leaves_unremovable: bool = False
    timeout: int = 120


def train(*flags: str) -> Callable[[Where], list[str]]:
    """`hf-replacement train` on the tiny run's data with `flags`, into the case's directory."""
    return lambda where: ["train", *RUN, *flags, "--output-dir", str(where.case / "out")]


def resume(checkpoint: str, *flags: str) -> Callable[[Where], list[str]]:
    return lambda where: [*train(*flags)(where), "--resume-from", str(where.run / checkpoint)]


def _logged(phrase: str, differs: bool = False) -> Callable[[Where, Any], str | None]:
    """The run said `phrase`; with `differs`, its weights also differ from the reference run's."""

    def check(where: Where, outcome: Any) -> str | None:
        if phrase not in outcome.logs + outcome.stdout:
            return f"not said: {phrase!r}"
        if differs and _same_weights(where, outcome) is None:
            return "the weights equal the first run's: the change was dropped"
        return None

    return check


def _same_weights(where: Where, outcome: Any) -> str | None:
    reference, resumed = load_file(where.run / WEIGHTS), load_file(where.case / "out" / WEIGHTS)
    same = all((reference[key] == resumed[key]).all() for key in reference)
    return None if same else "a resume with the same flags did not reproduce the straight run bit for bit"


# --- command-line flags --------------------------------------------------------------------------------------

FLAGS = "train: flags"
_BAD_FLAGS = [
    (["--epochs", "0"], None), (["--epochs", "-1"], None), (["--epochs", "nan"], None), (["--batch-size", "0"], None),
    (["--batch-size", "x"], None), (["--lr", "0"], None), (["--lr", "-1"], None), (["--lr", "inf"], None),
    (["--weight-decay", "-0.1"], None), (["--gradient-accumulation-steps", "0"], None), (["--image-size", "0"], None),
    (["--max-train-samples", "0"], None), (["--checkpointing-steps", "0"], None), (["--replace-interval", "0"], None),
    (["--replace-interval", "1"], None), (["--replaced-blocks", "0"], None), (["--replaced-blocks", "99"], None),
    (["--replaced-blocks", "a"], None), (["--replaced-blocks", "3,4"], None), (["--coefficient-init", "x"], None),
    (["--coefficient-init", "1,2,3"], None), (["--coefficient-init", "nan,0"], None),
    (["--surrogate", "quarter"], None),
    (["--coefficient-granularity", "row"], None), (["--fusion", "mean"], None), (["--mixed-precision", "fp8"], None),
    (["--mixed-precision", "fp16"], "needs a CUDA GPU"), (["--fsdp"], "this is one process"),
    (["--model", "no-such-preset"], "is not a preset"), (["--model", "someone/missing-model"], None),
    (["--replaced-blocks", "3", "--replace-interval", "4"], "not allowed with"),
    (["--baseline", "--surrogate", "half"], "--baseline: not allowed with --surrogate"),
    (["--baseline", "--coefficient-init", "fit"], "--baseline: not allowed with --coefficient-init"),
    (["--batch-size", "1000"], "no training batch"),
]  # fmt: skip
FLAG_CASES = [
    Case(FLAGS, "train " + " ".join(flags), train(*flags), says=says) for flags, says in _BAD_FLAGS
] + [
    # From scratch the fit is to the random initial weights: allowed, and the summary prints what it found.
    Case(FLAGS, "train --coefficient-init fit (a model from scratch)", train("--coefficient-init", "fit"),
         expect="works", check=_logged("fitted initial coefficients, relative reconstruction error")),  # fmt: skip
]

# --- data -----------------------------------------------------------------------------------------------------

DATA = "train/evaluate: data"


def image_folder(directory: Path, classes: int, images: int = 8, size: int = 8) -> Path:
    for label in range(classes):
        (directory / f"class{label}").mkdir(parents=True)
        for index in range(images):
            PILImage.new("RGB", (size, size), (20 * label, index, 0)).save(directory / f"class{label}" / f"{index}.png")
    return directory


def _folder(classes: int, damage: Callable[[Path], None] | None = None) -> Callable[[Where], None]:
    def prepare(where: Where) -> None:
        folder = image_folder(where.case / "images", classes)
        if damage:
            damage(folder)

    return prepare


def _corrupt_image(folder: Path) -> None:
    (folder / "class0" / "0.png").write_bytes(b"\x89PNG not really")


def _train_on_images(*flags: str) -> Callable[[Where], list[str]]:
    return lambda where: ["train", "--dataset", str(where.case / "images"), "--epochs", "1", "--batch-size", "4",
                          *flags, "--output-dir", str(where.case / "out")]  # fmt: skip


def _evaluate_on_images(where: Where) -> list[str]:
    return ["evaluate", str(where.run), "--dataset", str(where.case / "images")]


def _same_accuracy_as_the_run(where: Where, outcome: Any) -> str | None:
    expected = json.loads((where.run / "results.json").read_text())["accuracy"]
    got = json.loads(outcome.stdout)["accuracy"]
    return None if got == expected else f"accuracy {got}, the run's evaluation gave {expected}"


DATA_CASES = [
    Case(DATA, "train --dataset no-such-name (not a directory, no Hub)", train("--dataset", "no-such-name")),
    Case(DATA, "train --dataset imagefolder without --data-dir", train("--dataset", "imagefolder")),
    Case(DATA, "train --dataset fashion-mnist --data-dir <empty directory>",
         lambda w: [*train("--data-dir", str(w.case))(w)[:-2], "--dataset", "fashion-mnist",
                    "--output-dir", str(w.case / "out")]),  # fmt: skip
    Case(DATA, "train on an image folder with one class", _train_on_images(), prepare=_folder(1)),
    Case(DATA, "train on an image folder with a corrupt image", _train_on_images(), prepare=_folder(3, _corrupt_image)),
    Case(DATA, "train on an empty directory", _train_on_images(), prepare=lambda w: (w.case / "images").mkdir()),
    Case(DATA, "evaluate A (10 classes) on a folder of 3 classes", _evaluate_on_images, says="predicts 10 classes",
         prepare=_folder(3)),  # fmt: skip
    Case(DATA, "evaluate A (10 classes) on a folder of 12 classes", _evaluate_on_images, says="predicts 10 classes",
         prepare=_folder(12)),  # fmt: skip
    Case(DATA, "evaluate A on its own data (digits)", lambda w: ["evaluate", str(w.run), "--dataset", "digits",
         "--max-eval-samples", "32"], expect="works", check=_same_accuracy_as_the_run),  # fmt: skip
]

# --- output directory -----------------------------------------------------------------------------------------

OUTPUT = "train/merge: output directory"


def _a_file(where: Where) -> None:
    (where.case / "file").write_text("keep me")


def _file_kept(where: Where, outcome: Any) -> str | None:
    return None if (where.case / "file").read_text() == "keep me" else "the file was overwritten"


OUTPUT_CASES = [
    Case(OUTPUT, "train --output-dir <an existing file>", lambda w: [*train()(w)[:-1], str(w.case / "file")],
         prepare=_a_file, says="is a file"),  # fmt: skip
    Case(OUTPUT, "train --output-dir under a file", lambda w: [*train()(w)[:-1], str(w.case / "file" / "out")],
         prepare=_a_file),  # fmt: skip
    Case(OUTPUT, "train --output-dir /proc/not-writable", lambda w: [*train()(w)[:-1], "/proc/not-writable"]),
    Case(OUTPUT, "merge A <an existing file>", lambda w: ["merge", str(w.run), str(w.case / "file")],
         prepare=_a_file, says="is a file"),  # fmt: skip
    Case(OUTPUT, "merge A <a non-empty directory>", lambda w: ["merge", str(w.run), str(w.run)], says="not empty"),
    Case(OUTPUT, "merge <a merged (plain) model> <new directory>",
         lambda w: ["merge", str(w.case / "plain"), str(w.case / "again")], says="nothing to merge",
         prepare=lambda w: _quiet_main(["merge", str(w.run), str(w.case / "plain")])),  # fmt: skip
    Case(OUTPUT, "merge A <new directory>", lambda w: ["merge", str(w.run), str(w.case / "merged")], expect="works",
         check=lambda w, o: None if (w.case / "merged" / "config.json").is_file()
         and not (w.case / "merged" / "replacement_config.json").exists() else "no plain model written"),  # fmt: skip
]


def _quiet_main(argv: list[str]) -> None:
    import io

    from hf_replacement.commands.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0

# --- damaged checkpoints ----------------------------------------------------------------------------------------

DAMAGED = "evaluate/merge/resume: damaged checkpoints"


def _copy(where: Where, checkpoint: str | None = None) -> Path:
    """A copy of the run (or of one of its checkpoints) in the case's directory, to damage."""
    source = where.run / checkpoint if checkpoint else where.run
    target = where.case / (checkpoint or "A")
    shutil.copytree(source, target, ignore=None if checkpoint else shutil.ignore_patterns("checkpoint-*"))
    return target


def _edit_config(edit: Callable[[dict], Any]) -> Callable[[Where], None]:
    def prepare(where: Where) -> None:
        path = _copy(where) / "replacement_config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps(edit(config)))

    return prepare


def _file_damage(name: str, damage: Callable[[Path], None], checkpoint: str | None = None) -> Callable[[Where], None]:
    return lambda where: damage(_copy(where, checkpoint) / name)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delete(path: Path) -> None:
    path.unlink()


def _drop_a_tensor(path: Path) -> None:
    tensors = load_file(path)
    del tensors[sorted(tensors)[len(tensors) // 2]]
    save_file(tensors, path, metadata={"format": "pt"})


def _reshape_a_tensor(path: Path) -> None:
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if tensors[k].dim() == 2)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def _a_pickle_instead(path: Path) -> None:
    """Weights as a pickle (what `torch.save` writes, and what loading could execute): never to be loaded."""
    path.unlink()
    (path.parent / "pytorch_model.bin").write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR." * 2)


def _mixed_checkpoint(where: Where) -> None:
    copy = _copy(where, "checkpoint-2")
    shutil.copyfile(where.run / "checkpoint-4" / "model.safetensors", copy / "model.safetensors")


def _evaluate_copy(where: Where) -> list[str]:
    return ["evaluate", str(where.case / "A"), "--max-eval-samples", "32"]


def _resume_copy(checkpoint: str) -> Callable[[Where], list[str]]:
    return lambda where: [*train()(where), "--resume-from", str(where.case / checkpoint)]


def _damaged(what: str, prepare: Callable[[Where], None], says: str | None = None) -> list[Case]:
    """The damage met by `evaluate` and by `merge`."""
    return [
        Case(DAMAGED, f"evaluate A: {what}", _evaluate_copy, prepare=prepare, says=says),
        Case(DAMAGED, f"merge A: {what}", lambda w: ["merge", str(w.case / "A"), str(w.case / "merged")],
             prepare=prepare, says=says),  # fmt: skip
    ]


DAMAGED_CASES = [
    *_damaged("replacement_config.json lost its surrogate key", _edit_config(lambda c: c.pop("surrogate") and c),
              says="lacks the key(s) ['surrogate']"),  # fmt: skip
    *_damaged("replacement_config.json is not JSON", _file_damage("replacement_config.json", _truncate)),
    *_damaged("replacement_config.json holds a list", _edit_config(lambda c: [c])),
    *_damaged("replacement_config.json names an unknown surrogate", _edit_config(lambda c: c | {"surrogate": "x"})),
    *_damaged("replacement_config.json from a newer format", _edit_config(lambda c: c | {"format_version": 99})),
    *_damaged("base_config.json deleted", _file_damage("base_config.json", _delete),
              says="base_config.json is missing"),  # fmt: skip
    *_damaged("model.safetensors truncated", _file_damage("model.safetensors", _truncate)),
    *_damaged("model.safetensors deleted", _file_damage("model.safetensors", _delete)),
    *_damaged("model.safetensors replaced by a pickle", _file_damage("model.safetensors", _a_pickle_instead)),
    *_damaged("a tensor missing from model.safetensors", _file_damage("model.safetensors", _drop_a_tensor)),
    *_damaged("a tensor of another shape", _file_damage("model.safetensors", _reshape_a_tensor)),
    Case(DAMAGED, "evaluate a directory that does not exist", lambda w: ["evaluate", str(w.case / "none")]),
    Case(DAMAGED, "evaluate a file", lambda w: ["evaluate", str(w.case / "file")], prepare=_a_file),
    Case(DAMAGED, "resume: training_state.json deleted", _resume_copy("checkpoint-2"),
         prepare=_file_damage("training_state.json", _delete, "checkpoint-2")),  # fmt: skip
    Case(DAMAGED, "resume: training_state.safetensors truncated", _resume_copy("checkpoint-2"),
         prepare=_file_damage("training_state.safetensors", _truncate, "checkpoint-2")),  # fmt: skip
    Case(DAMAGED, "resume: training_state.json truncated", _resume_copy("checkpoint-2"),
         prepare=_file_damage("training_state.json", _truncate, "checkpoint-2")),  # fmt: skip
    Case(DAMAGED, "resume: a mixed checkpoint (checkpoint-4's weights in checkpoint-2)", _resume_copy("checkpoint-2"),
         prepare=_mixed_checkpoint, says="mixes two saves"),  # fmt: skip
    Case(DAMAGED, "resume from the final output directory (not a checkpoint)",
         lambda w: [*train()(w), "--resume-from", str(w.run)], says="not a training checkpoint"),  # fmt: skip
]

# --- resume -----------------------------------------------------------------------------------------------------

RESUME = "train --resume-from: flags"
_REFUSED_ON_RESUME = [
    ["--epochs", "1"], ["--epochs", "3"], ["--batch-size", "16"], ["--gradient-accumulation-steps", "2"],
    ["--mixed-precision", "bf16"], ["--seed", "1"], ["--max-train-samples", "96"], ["--image-size", "16"],
    ["--dataset", "digits", "--max-train-samples", "128"], ["--model", "vit-tiny"], ["--surrogate", "half"],
    ["--replace-interval", "3"], ["--coefficient-granularity", "tensor"], ["--detach-neighbors"],
]  # fmt: skip


RESUME_CASES = [
    *[Case(RESUME, "resume checkpoint-2 with " + " ".join(flags), resume("checkpoint-2", *flags), says="cannot honour"
           if flags[0] not in ("--model", "--surrogate", "--replace-interval", "--coefficient-granularity",
                               "--detach-neighbors") else None) for flags in _REFUSED_ON_RESUME],  # fmt: skip
    Case(RESUME, "resume checkpoint-2 with --lr 0.5 (the first run: 1e-3)", resume("checkpoint-2", "--lr", "0.5"),
         expect="works", check=_logged("--lr 0.5 (the saved run: 0.001) is applied", differs=True)),  # fmt: skip
    Case(RESUME, "resume checkpoint-2 with --weight-decay 0.5", resume("checkpoint-2", "--weight-decay", "0.5"),
         expect="works", check=_logged("--weight-decay 0.5 (the saved run: 0.05) is applied", differs=True)),
    Case(RESUME, "resume checkpoint-2 with the same flags", resume("checkpoint-2"), expect="works",
         check=_same_weights),  # fmt: skip
    Case(RESUME, "resume checkpoint-4 (the last update) with the same flags", resume("checkpoint-4"), expect="works",
         check=_logged("no update taken: the run had already reached its 4 updates")),  # fmt: skip
    Case(RESUME, "resume from a checkpoint that does not exist", resume("checkpoint-999")),
    Case(RESUME, "resume --baseline from a RepL checkpoint",
         lambda w: [*train("--baseline")(w), "--resume-from", str(w.run / "checkpoint-2")]),  # fmt: skip
]

# --- faults while saving ----------------------------------------------------------------------------------------

SAVING = "train: faults while saving"
INTACT = "the last complete checkpoint"


@contextlib.contextmanager
def _patched(module_name: str, name: str, replacement: Callable[[Callable], Callable]) -> Iterator[None]:
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    setattr(module, name, replacement(original))
    try:
        yield
    finally:
        setattr(module, name, original)


def _on_call(number: int, act: Callable[[Where], None]) -> Callable[[Where], contextlib.AbstractContextManager]:
    """The `number`-th safetensors file the writer saves first meets `act` (a fault raised, a directory changed).

    Each checkpoint writes two files (weights, training state): call 3 is checkpoint-4's weights, 4 its
    training state, 5 the final model."""

    def fault(where: Where) -> contextlib.AbstractContextManager:
        calls = []

        def wrap(save_file: Callable) -> Callable:
            def save(*args, **kwargs):
                calls.append(1)
                if len(calls) == number:
                    act(where)
                return save_file(*args, **kwargs)

            return save

        return _patched("hf_replacement.checkpoint", "save_file", wrap)

    return fault


def _raise(error: BaseException) -> Callable[[Where], None]:
    def act(where: Where) -> None:
        raise error

    return act


@contextlib.contextmanager
def _read_only_mid_save(where: Where) -> Iterator[None]:
    """The output directory turns read-only as checkpoint-4's weights are written (its temporary files exist).

    Root writes into read-only directories: from that moment the case goes on with the rights of
    `nobody`, as most users run (the rights come back when the case ends)."""
    dropped = []

    def turn_read_only(where: Where) -> None:
        out = where.case / "out"
        if os.geteuid() == 0:  # the run's files become nobody's own, as a user's run would have written them
            nobody = pwd.getpwnam("nobody")
            for path in [out, *out.rglob("*")]:
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
            os.setegid(nobody.pw_gid)
            os.seteuid(nobody.pw_uid)
            dropped.append(True)
        os.chmod(out, 0o555)

    try:
        with _on_call(3, turn_read_only)(where):
            yield
    finally:
        if dropped:
            os.seteuid(0)
            os.setegid(0)
        if (where.case / "out").exists():
            os.chmod(where.case / "out", 0o755)


def _interrupt_training(where: Where) -> contextlib.AbstractContextManager:
    calls = []

    def wrap(train_step: Callable) -> Callable:
        def step(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return train_step(*args, **kwargs)

        return step

    return _patched("hf_replacement.commands.train", "train_step", wrap)


SAVING_CASES = [
    Case(SAVING, "disk full (safetensors) while saving checkpoint-4", train(), says=INTACT, exit_code=1,
         fault=_on_call(3, _raise(SafetensorError(DISK_FULL)))),  # fmt: skip
    Case(SAVING, "disk full (ENOSPC) while saving checkpoint-4's training state", train(), says=INTACT, exit_code=1,
         fault=_on_call(4, _raise(OSError(28, "No space left on device")))),  # fmt: skip
    Case(SAVING, "disk full while saving the final model", train(), says=INTACT, exit_code=1,
         fault=_on_call(5, _raise(SafetensorError(DISK_FULL)))),  # fmt: skip
    Case(SAVING, "Ctrl-C while saving checkpoint-4", train(), says=INTACT, exit_code=130,
         fault=_on_call(3, _raise(KeyboardInterrupt()))),  # fmt: skip
    Case(SAVING, "Ctrl-C while saving the final model", train(), says=INTACT, exit_code=130,
         fault=_on_call(5, _raise(KeyboardInterrupt()))),  # fmt: skip
    Case(SAVING, "Ctrl-C while training (update 3)", train(), says=INTACT, exit_code=130, fault=_interrupt_training),
    Case(SAVING, "the output directory turns read-only while saving checkpoint-4", train(), says="Permission denied",
         exit_code=1, fault=_read_only_mid_save, leaves_unremovable=True),  # fmt: skip
]

# --- real signals and concurrent runs (processes of their own) --------------------------------------------------

PROCESSES = "train: signals and concurrent runs"
LONG_RUN = [*TINY, "--max-train-samples", "64", "--epochs", "20", "--checkpointing-steps", "2"]  # 40 updates


def _start(where: Where, flags: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "hf_replacement.commands.cli", "train", *flags,
               "--output-dir", str(where.case / "out")]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_environment(), preexec_fn=_ctrl_c_as_in_a_terminal)  # fmt: skip


def _ctrl_c_as_in_a_terminal() -> None:
    """A study started in the background inherits an ignored SIGINT from the shell: the run must not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def _finish(process: subprocess.Popen, timeout: int, started: float) -> Any:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        return Outcome(None, stdout, stderr, stderr, time.monotonic() - started, hang=True)
    return Outcome(process.returncode, stdout, stderr, stderr, time.monotonic() - started)


def _real_ctrl_c(where: Where, timeout: int) -> Any:
    started, process = time.monotonic(), _start(where, LONG_RUN)
    _wait_for(where.case / "out" / "checkpoint-6", process, timeout)
    process.send_signal(signal.SIGINT)
    return _finish(process, timeout, started)


def _killed_then_resumed(where: Where, timeout: int) -> Any:
    """SIGKILL mid-run, then `--resume-from` the last complete checkpoint into the same directory."""
    process = _start(where, LONG_RUN)
    _wait_for(where.case / "out" / "checkpoint-6", process, timeout)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    steps = [int(p.name.split("-")[1]) for p in (where.case / "out").glob("checkpoint-*") if p.name[11:].isdigit()]
    last = where.case / "out" / f"checkpoint-{max(steps)}"
    return run_in_process(["train", *LONG_RUN, "--output-dir", str(where.case / "out"), "--resume-from", str(last)],
                          timeout)  # fmt: skip


def _equals_a_straight_run(where: Where, outcome: Any) -> str | None:
    straight = run_in_process(["train", *LONG_RUN, "--output-dir", str(where.case / "straight")], 300)
    if straight.code != 0:
        return f"the straight run failed: {straight.stderr[-300:]}"
    reference, resumed = load_file(where.case / "straight" / WEIGHTS), load_file(where.case / "out" / WEIGHTS)
    same = all((reference[key] == resumed[key]).all() for key in reference)
    return None if same else "the resumed run's weights differ from a straight run's"


def _two_runs_at_once(where: Where, timeout: int) -> Any:
    """A second run into the directory a live run owns; the first must still finish and save."""
    first = _start(where, LONG_RUN)
    lock = where.case / "out" / ".hf-replacement.lock"
    deadline = time.monotonic() + timeout
    while not (lock.exists() and lock.stat().st_size) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = run_in_process(["train", *RUN, "--output-dir", str(where.case / "out")], timeout)
    first_outcome = _finish(first, timeout, time.monotonic())
    if first_outcome.code != 0:
        second.stderr += f"\nhf-replacement train: the first run failed: {first_outcome.stderr[-300:]}"
        second.code = second.code or 1
    return second


PROCESS_CASES = [
    Case(PROCESSES, "Ctrl-C (SIGINT) mid-run", runner=_real_ctrl_c, says=INTACT, exit_code=130),
    Case(PROCESSES, "SIGKILL mid-run, then --resume-from the last checkpoint into the same directory",
         runner=_killed_then_resumed, expect="works", check=_equals_a_straight_run, timeout=300),  # fmt: skip
    Case(PROCESSES, "a second train into the --output-dir of a live run", runner=_two_runs_at_once,
         says="is in use by another hf-replacement train", timeout=300),  # fmt: skip
]

# --- divergence -------------------------------------------------------------------------------------------------

DIVERGENCE = "train: divergence"
DIVERGING = [*TINY, "--max-train-samples", "128", "--epochs", "8"]  # 32 updates: room for a 20-update window


def _diverging(*flags: str) -> Callable[[Where], list[str]]:
    return lambda where: ["train", *DIVERGING, *flags, "--output-dir", str(where.case / "out")]


def _convnext_at_lr_10(*flags: str) -> Callable[[Where], list[str]]:
    return lambda where: ["train", "--model", "convnext-mini", "--dataset", "digits", "--max-eval-samples", "32",
                          "--epochs", "2", "--lr", "10", *flags, "--output-dir", str(where.case / "out")]  # fmt: skip


def _no_alarm(where: Where, outcome: Any) -> str | None:
    return "a divergence warning on a healthy run" if "is diverging" in outcome.logs else None


DIVERGENCE_CASES = [
    # The run: ConvNeXt at --lr 10 climbs to a loss in the thousands and ends at chance, short of NaN.
    Case(DIVERGENCE, "train --model convnext-mini --lr 10", _convnext_at_lr_10(), expect="works",
         check=_logged("warning: the training loss is diverging")),  # fmt: skip
    Case(DIVERGENCE, "train --model convnext-mini --lr 10 --stop-on-divergence",
         _convnext_at_lr_10("--stop-on-divergence"), says="is diverging", exit_code=1),  # fmt: skip
    Case(DIVERGENCE, "train --lr 1 (vit-mini)", _diverging("--lr", "1"), expect="works",
         check=_logged("warning: the training loss is diverging")),  # fmt: skip
    Case(DIVERGENCE, "train --lr 10 (vit-mini: NaN at update 7)", _diverging("--lr", "10"), says="nan"),
    Case(DIVERGENCE, "train --lr 1e30", _diverging("--lr", "1e30"), says="nan"),
    Case(DIVERGENCE, "train with the default --lr (no alarm)", _diverging(), expect="works", check=_no_alarm),
    Case(DIVERGENCE, "train --baseline with the default --lr (no alarm)", _diverging("--baseline"), expect="works",
         check=_no_alarm),  # fmt: skip
]

CASES = [
    *FLAG_CASES, *DATA_CASES, *OUTPUT_CASES, *DAMAGED_CASES, *RESUME_CASES, *SAVING_CASES, *PROCESS_CASES,
    *DIVERGENCE_CASES,
]  # fmt: skip
