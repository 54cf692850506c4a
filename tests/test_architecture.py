"""The code base's own rules: no private name crosses a module boundary, every module is in the
README's architecture section, and the one vocabulary is used by every public entry point."""

import ast
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

import accelprune

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "accelprune"


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_is_imported_across_modules(path):
    tree = ast.parse(path.read_text())
    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("accelprune"):
            own_package = path.parent == PACKAGE / "kernels" and "kernels" in node.module
            for alias in node.names:
                if alias.name.startswith("_") and not own_package:
                    offenders.append(f"from {node.module} import {alias.name}")
    assert not offenders, offenders


def test_readme_architecture_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    for path in _modules():
        name = str(path.relative_to(PACKAGE))
        if name == "__init__.py" or name.startswith("kernels/"):
            continue
        assert f"`{name}`" in section, f"{name} is missing from the README's architecture section"
    assert "`kernels/`" in section


@pytest.mark.parametrize("fn", [accelprune.prune, accelprune.REPrune, accelprune.CSGD,
                                accelprune.prune_with])
def test_sparsity_is_the_third_positional_parameter(fn):
    params = list(inspect.signature(fn).parameters)
    assert params[2] == "sparsity"


def test_no_other_name_for_the_fraction_removed():
    bad = re.compile(r"\b(keep_ratio|pruning_ratio)\b")
    for path in _modules():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if bad.search(line) and "MetaPruner" not in line and "TP's" not in line:
                pytest.fail(f"{path.name}:{i}: {line.strip()}")


def _loads_nothing_heavy(code: str) -> None:
    """Run ``code`` in a fresh interpreter, then check that it imported none of torch,
    Torch-Pruning, timm or torchvision."""
    check = ("import sys\n"
             "heavy = [m for m in ('torch', 'torch_pruning', 'timm', 'torchvision')\n"
             "         if m in sys.modules]\n"
             "assert not heavy, f'loaded {heavy}'\n")
    result = subprocess.run([sys.executable, "-c", code + check], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_clustering_and_coverage_load_without_torch():
    """Users who only cluster or cover (benchmarks, other libraries) do not pay for torch,
    Torch-Pruning, timm or torchvision: the package's public names load on first use."""
    _loads_nothing_heavy("import accelprune, accelprune.cluster, accelprune.coverage\n")


def test_every_public_name_resolves():
    for name in accelprune.__all__:
        assert getattr(accelprune, name) is not None
        assert name in dir(accelprune)
    assert accelprune.REPrune.__module__ == "accelprune.reprune"
    with pytest.raises(AttributeError, match="no attribute 'Reprune'"):
        accelprune.Reprune  # noqa: B018


def test_command_line_help_loads_nothing_heavy():
    """``accelprune --help`` answers at once: the method names live in a module without torch."""
    _loads_nothing_heavy(
        "from accelprune.cli import main\n"
        "for argv in (['--help'], ['prune', '--help'], ['demo', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n")


def test_method_names_match_the_criteria_classes():
    from accelprune.importance import IMPORTANCES
    from accelprune.methods import CRITERIA, METHODS

    assert tuple(IMPORTANCES) == CRITERIA and METHODS[: len(CRITERIA)] == CRITERIA
    assert accelprune.METHODS is METHODS
