"""The fault study: bad inputs and faults fed to `hf-replacement`, each outcome sorted into a category.

    python scripts/fault_study.py                      # every case (a few minutes on 2 CPU cores)
    python scripts/fault_study.py --categories resume  # some categories (comma-separated)
    python scripts/fault_study.py --list               # the cases, without running them

Each case is a command a user could type (plus, for faults, where the operating system or the user
strikes: a full disk, a directory turned read-only, Ctrl-C, a second run, SIGKILL). It is run as the
user would meet it, and its outcome is one of:

- clear: one line naming the problem (exit 1, 2 or 130, no traceback), or, for an input that is valid,
  the correct result and what was done said (e.g. a changed --lr applied and logged);
- silent: exit 0 without a word where the input should have been refused, or a wrong result;
- hang: no answer within the case's time limit;
- traceback: a Python traceback reaches the user;
- other: refused with something other than one line, or a valid input refused.

It also counts the temporary files (`*.tmp`, `*.backup`) left in the directories a case wrote to.
The per-case records go to `scripts/fault_study.json`; the table by category replaces the block between
the markers in `docs/reliability.md`. Most cases run in this process (through `cli.main`, as the
console script does); real signals, concurrent runs and SIGKILL run `python -m hf_replacement.commands.cli`.
Faults are injected where the operating system would raise them (the writer's `save_file`), and a
read-only directory is made one by giving up root's rights (`seteuid`) while the case runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a Hub id must fail at once, not wait on the network
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fault_cases import CASES, RUN, Case, Where  # noqa: E402
from fault_running import Outcome, run_in_process  # noqa: E402

from hf_replacement.commands.cli import main  # noqa: E402

RECORDS = REPO / "scripts" / "fault_study.json"
DOC = REPO / "docs" / "reliability.md"
START, END = "<!-- fault-study:start -->", "<!-- fault-study:end -->"
LEFTOVER = re.compile(r"\.(tmp|backup)$")
OUTCOMES = ("clear", "silent", "hang", "traceback", "other")


def last_line(text: str) -> str:
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return lines[-1] if lines else ""


def classify(case: Case, outcome: Outcome, where: Where) -> tuple[str, str]:
    """(category of the outcome, why)."""
    if outcome.hang:
        return "hang", f"no answer in {case.timeout} s"
    if outcome.escaped or "Traceback (most recent call last)" in outcome.stderr:
        return "traceback", (outcome.escaped or outcome.stderr).strip().splitlines()[-1][:300]
    line = last_line(outcome.stderr)
    if case.expect == "works":
        if outcome.code != 0:
            return "other", f"a valid input refused (exit {outcome.code}): {line[:300]}"
        problem = case.check(where, outcome) if case.check else None
        return ("silent", problem) if problem else ("clear", "the correct result, said")
    if outcome.code == 0:
        return "silent", "exit 0"
    if not line.startswith("hf-replacement") or (case.says and case.says not in line):
        return "other", f"exit {outcome.code}, last line: {line[:300]}"
    if case.exit_code is not None and outcome.code != case.exit_code:
        return "other", f"exit {outcome.code} (expected {case.exit_code}): {line[:300]}"
    return "clear", line[:400]


def leftovers(*directories: Path) -> list[str]:
    found = []
    for directory in directories:
        for root, dirs, files in os.walk(directory):
            found += [os.path.join(root, name) for name in dirs + files if LEFTOVER.search(name)]
            dirs[:] = [name for name in dirs if not LEFTOVER.search(name)]  # a leftover directory counts once
    return sorted(found)


def reference_run(root: Path) -> Path:
    """The finished run the cases evaluate, merge, resume and damage: checkpoints at updates 2 and 4 (the last)."""
    run = root / "A"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["train", *RUN, "--output-dir", str(run)])
    if code != 0:
        raise SystemExit(f"the reference run failed (exit {code}); the study needs it")
    return run


def run_case(index: int, case: Case, run: Path, root: Path) -> dict:
    where = Where(run=run, case=root / f"case-{index:03d}")
    where.case.mkdir()
    with case.fault(where) if case.fault else contextlib.nullcontext():
        if case.prepare:
            case.prepare(where)
        if case.runner:
            outcome = case.runner(where, case.timeout)
        else:
            outcome = run_in_process(case.argv(where), case.timeout)
    category, why = classify(case, outcome, where)
    left = leftovers(where.case, run)
    for path in left:  # the next case starts clean (a directory listed before the files in it)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)
    return {
        "category": case.category,
        "input": case.what,
        "outcome": category,
        "detail": why,
        "exit_code": outcome.code,
        "seconds": round(outcome.seconds, 2),
        "temporary_files_left": [os.path.relpath(path, root) for path in left],
        "process_could_remove_them": not case.leaves_unremovable,
    }


def table(records: list[dict]) -> str:
    categories = list(dict.fromkeys(record["category"] for record in records))
    rows = [
        "| category | inputs tried | " + " | ".join(OUTCOMES) + " | temporary files left (the process could remove) |",
        "|---" * 8 + "|",
    ]
    for category in [*categories, None]:
        chosen = [r for r in records if category is None or r["category"] == category]
        counts = {outcome: sum(r["outcome"] == outcome for r in chosen) for outcome in OUTCOMES}
        left = sum(len(r["temporary_files_left"]) for r in chosen if r["process_could_remove_them"])
        name = "**all**" if category is None else category
        rows.append(f"| {name} | {len(chosen)} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + f" | {left} |")
    return "\n".join(rows)


def write_doc(records: list[dict], command: str, seconds: float) -> None:
    problems = [
        r for r in records if r["outcome"] != "clear" or (r["temporary_files_left"] and r["process_could_remove_them"])
    ]
    unremovable = [r for r in records if r["temporary_files_left"] and not r["process_could_remove_them"]]
    lines = [
        START,
        f"Generated by `{command}` ({len(records)} inputs, {seconds:.0f} s on this machine); per-case records: "
        "[`scripts/fault_study.json`](../scripts/fault_study.json).",
        "",
        table(records),
        "",
    ]
    if problems:
        lines += ["Not clear yet:", ""] + [f"- {r['category']}: `{r['input']}`: {r['outcome']} ({r['detail']})"
                                            for r in problems]  # fmt: skip
    else:
        lines.append(
            "Every input tried got one clear line or the correct result, said; no temporary file the process could "
            "remove was left."
        )
    for r in unremovable:
        names = ", ".join(f"`{os.path.basename(path)}`" for path in r["temporary_files_left"])
        lines += ["", f"`{r['input']}` leaves {names}: the directory no longer lets the process remove it; the "
                  "error line names it, and the next run into the directory removes it."]  # fmt: skip
    block = "\n".join(lines) + "\n" + END
    text = DOC.read_text(encoding="utf-8")
    before, _, rest = text.partition(START)
    _, _, after = rest.partition(END)
    DOC.write_text(before + block + after, encoding="utf-8")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Transformers' and Accelerate's own chatter (weights initialised, ...) is not what is studied."""
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger().setLevel(logging.INFO)
    yield


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", help="comma-separated categories to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the cases and stop")
    parser.add_argument("--no-write", action="store_true", help="print the table only; keep the records and doc")
    return parser.parse_args(argv)


def selected(categories: str | None) -> list[Case]:
    if not categories:
        return CASES
    wanted = [name.strip() for name in categories.split(",")]
    known = list(dict.fromkeys(case.category for case in CASES))
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(f"--categories: unknown {unknown}; the categories are {known}")
    return [case for case in CASES if case.category in wanted]


def study(argv: list[str] | None = None, on_record: Callable[[dict], None] | None = None) -> list[dict]:
    arguments = parse_arguments(argv)
    cases = selected(arguments.categories)
    if arguments.list:
        for case in cases:
            print(f"{case.category}: {case.what}")
        return []
    started = time.perf_counter()
    records = []
    with quiet_libraries(), tempfile.TemporaryDirectory(prefix="fault-study-") as directory:
        root = Path(directory)
        os.chmod(root, 0o755)  # a case run with another user's rights must reach its directory
        run = reference_run(root)
        for index, case in enumerate(cases):
            record = run_case(index, case, run, root)
            records.append(record)
            print(f"{record['outcome']:9s} {record['seconds']:6.1f}s  {case.category}: {case.what}", flush=True)
            if on_record:
                on_record(record)
    seconds = time.perf_counter() - started
    print(table(records))
    if not arguments.no_write:
        RECORDS.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
        command = "python scripts/fault_study.py" + (f" --categories {arguments.categories}" if arguments.categories
                                                     else "")  # fmt: skip
        write_doc(records, command, seconds)
    return records


if __name__ == "__main__":
    study(sys.argv[1:])
