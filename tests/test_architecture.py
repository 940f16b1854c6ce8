"""The layout promises: the installed package is the plugin and its launcher, without import cycles;
the launcher's RepL flags come from `ReplacementConfig`."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.metadata
import pathlib
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from hf_replacement import ReplacementConfig
from hf_replacement.commands.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_replacement"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_statements(path: pathlib.Path) -> list[tuple[ast.AST, str]]:
    """Each import statement of `path` (module level or inside a function) with the absolute module a
    `from ... import` names (relative imports resolved); "" for a plain `import`."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node, base))
        elif isinstance(node, ast.Import):
            found.append((node, ""))
    return found


def _package_imports(path: pathlib.Path) -> set[str]:
    """Every `hf_replacement` module `path` imports, at module level or inside a function."""
    found = set()
    for node, base in _import_statements(path):
        if isinstance(node, ast.ImportFrom):
            if base.split(".")[0] != "hf_replacement":
                continue
            for alias in node.names:  # `from . import layer` names a module, `from .x import y` a member
                candidate = f"{base}.{alias.name}"
                found.add(candidate if (ROOT / (candidate.replace(".", "/") + ".py")).exists() else base)
        else:
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "hf_replacement"}
    return found - {_module_name(path)}


def _imported_names(path: pathlib.Path) -> list[tuple[str, str]]:
    """(module, name) for each `from hf_replacement... import name` in `path` (relative imports resolved);
    (module, "*") for a plain `import hf_replacement...`."""
    found = []
    for node, base in _import_statements(path):
        if isinstance(node, ast.ImportFrom):
            if base.split(".")[0] == "hf_replacement":
                found += [(base, alias.name) for alias in node.names]
        else:
            found += [(a.name, "*") for a in node.names if a.name.split(".")[0] == "hf_replacement"]
    return found


_APPLICATIONS = [
    path
    for folder in (PACKAGE / "commands", ROOT / "benchmarks")
    for path in sorted(folder.rglob("*.py"))
]


@pytest.mark.parametrize("path", _APPLICATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_launcher_and_the_benchmarks_import_only_exported_names(path):
    """commands/ and benchmarks/ are applications of the library: they use what its modules export
    (`__all__`), so what they rely on is a deliberate API (the launcher's own modules excepted, for itself)."""
    importer = _module_name(path)
    private = []
    for module_name, name in _imported_names(path):
        if importer.startswith("hf_replacement.commands") and module_name.startswith("hf_replacement.commands"):
            continue  # the launcher's own modules
        if name == "*" and module_name == "hf_replacement":
            continue
        module = importlib.import_module(module_name)
        if name == "*" or name not in getattr(module, "__all__", ()):
            private.append(f"{module_name}.{name}")
    assert not private, f"{importer} imports names its modules do not export (add them to __all__, or stop): {private}"


def test_the_library_never_imports_the_launcher():
    library = [p for p in PACKAGE.rglob("*.py") if "commands" not in p.relative_to(PACKAGE).parts]
    offending = {
        _module_name(p): sorted(i for i in _package_imports(p) if i.startswith("hf_replacement.commands"))
        for p in library
    }
    assert not {module: imports for module, imports in offending.items() if imports}
    code = "import sys, hf_replacement; print(sorted(m for m in sys.modules if 'hf_replacement.commands' in m))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout
    assert output.strip() == "[]"


def test_the_core_never_imports_the_integrations():
    """integrations/ build on the core; only the package's `__init__` (the exported names) imports them."""
    core = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in ("commands", "integrations")]
    offending = {
        _module_name(p): sorted(i for i in _package_imports(p) if i.startswith("hf_replacement.integrations"))
        for p in core
        if p != PACKAGE / "__init__.py"
    }
    assert not {module: imports for module, imports in offending.items() if imports}


def test_readme_stays_short():
    """The README is the first screen and the ways in; the long explanations live in docs/ and benchmarks/."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines: move detail to docs/ (at most 160)"


# Longer functions are split (the launcher's loop reads top to bottom; each part has one job).
MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_80_lines():
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_package_has_no_import_cycle():
    graph = {_module_name(path): _package_imports(path) for path in PACKAGE.rglob("*.py")}
    # The package's __init__ re-exports: importing a submodule runs it first anyway, so edges into it are
    # no dependency of substance; edges out of it are what it exports.
    for imports in graph.values():
        imports.discard("hf_replacement")
    visiting, done, cycles = set(), set(), []

    def visit(node: str, trail: list[str]) -> None:
        if node in done or node not in graph:
            return
        if node in visiting:
            cycles.append(trail[trail.index(node) :] + [node])
            return
        visiting.add(node)
        for target in sorted(graph[node]):
            visit(target, trail + [target])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_importing_the_package_loads_no_benchmark_code():
    code = (
        "import sys, hf_replacement, hf_replacement.commands.cli; "
        "print(sorted(m for m in sys.modules if m.startswith('benchmarks')))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout
    assert output.strip() == "[]"


def _setup_keyword(name: str):
    call = next(
        node for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
    )
    return ast.literal_eval(next(keyword.value for keyword in call.keywords if keyword.arg == name))


def test_python_requires_admits_no_python_our_dependencies_refuse():
    """Else a user of that Python meets a resolver error about transformers instead of ours."""
    ours = SpecifierSet(_setup_keyword("python_requires"))
    for requirement in _setup_keyword("install_requires"):
        name = Requirement(requirement).name
        theirs = SpecifierSet(importlib.metadata.metadata(name).get("Requires-Python") or "")
        refused = [f"3.{minor}" for minor in range(8, 16) if f"3.{minor}.0" in ours and f"3.{minor}.0" not in theirs]
        assert not refused, f"python_requires {ours} admits Python {refused}, which {name} ({theirs}) does not"


def test_the_benchmark_harness_and_the_task_canvases_import_without_datasets():
    """A GPU machine may lack `datasets`: `--suite gpu` and the task canvases read their data without it."""
    code = (
        "import sys; sys.modules['datasets'] = None\n"  # any `import datasets` now raises ImportError
        "import benchmarks.harness.cli, benchmarks.speed, examples.task_data\n"
        "print(sorted(m for m in sys.modules if m == 'hf_replacement.commands.data'))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent
    ).stdout
    assert output.strip() == "[]"


@pytest.mark.slow
def test_wheel_ships_the_plugin_and_launcher_only(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("hf_replacement-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"hf_replacement"}
    assert "hf_replacement/commands/cli.py" in names and "hf_replacement/commands/train.py" in names
    assert "hf_replacement/templates/replacement_model_card.md" in names
    assert not [name for name in names if "benchmark" in name]


@pytest.mark.parametrize(
    "spec", [s for s in dataclasses.fields(ReplacementConfig) if s.metadata.get("cli")], ids=lambda s: s.name
)
def test_cli_replacement_flags_come_from_the_config(spec):
    train = next(
        action
        for action in build_parser()._subparsers._group_actions[0].choices["train"]._actions
        if action.dest == spec.name
    )
    assert train.option_strings == ["--" + spec.name.replace("_", "-")]
    assert train.default == spec.default
    assert spec.metadata["help"] in (train.help or "")
    assert train.choices == spec.metadata.get("choices")


def test_the_public_names_load_lazily_and_all_resolve():
    import hf_replacement

    assert set(hf_replacement.__all__) == set(hf_replacement._EXPORTS) | {"__version__"}
    for name in hf_replacement.__all__:
        assert getattr(hf_replacement, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        hf_replacement.NoSuchName  # noqa: B018


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["evaluate", "--help"], ["merge", "--help"]])
def test_the_command_line_answers_help_without_importing_torch(argv):
    """Parsing comes first: torch, Transformers and Accelerate load only in a command that runs."""
    code = (
        "import sys\n"
        "from hf_replacement.commands.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate', 'safetensors') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env_with_checkout()
    )
    assert "usage: hf-replacement" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []", result.stdout[-500:]


def _env_with_checkout() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _train_actions() -> dict[str, argparse.Action]:
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    return {action.dest: action for action in train._actions if action.dest != "help"}


def test_every_flag_has_help_a_shown_default_and_a_group():
    parser = build_parser()
    for name, command in parser._subparsers._group_actions[0].choices.items():
        rendered = " ".join(command.format_help().split())
        for action in command._actions:
            if action.dest == "help":
                continue
            label = f"{name} {action.option_strings or action.dest}"
            assert action.help, f"{label} has no help"
            if action.option_strings and action.default not in (None, False):
                shown = action.default
                if isinstance(shown, (list, tuple)):
                    shown = ",".join(map(str, shown)) if shown else "none"
                assert f"(default: {shown})" in rendered, f"{label} does not show its default {shown}"
            elif action.option_strings and action.default is None:
                assert "default" in action.help, f"{label} does not say what happens without it"
    groups = {
        group.title for group in parser._subparsers._group_actions[0].choices["train"]._action_groups if group.title
    }
    assert {"model and data", "RepL", "optimisation", "precision and processes", "checkpoints and Hub"} <= groups


def test_every_training_option_has_a_flag_with_the_same_default():
    """What results.json records under "options" is what the command line can set, defaults included."""
    from hf_replacement.commands.train import TrainingOptions

    actions = _train_actions()
    for spec in dataclasses.fields(TrainingOptions):
        if spec.name == "replacement":  # one flag per ReplacementConfig field, checked above
            continue
        assert spec.name in actions, f"TrainingOptions.{spec.name} has no flag"
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        assert actions[spec.name].default == default, spec.name
