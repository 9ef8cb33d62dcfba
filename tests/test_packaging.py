"""The package layout promised in DESIGN.md §1 holds."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(config["packages"]), config["package-dir"]


def test_every_package_folder_is_declared():
    declared, package_dir = _declared_packages()
    found = set()
    for prefix, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([prefix, *relative.parts]))
    # metaprune's own mapping also walks into training/serving only through their prefixes
    assert found == declared


def test_cli_parser_imports_no_heavy_library():
    # `metaprune serve` must stay small, and `metaprune --help` fast: building the parser loads
    # neither torch nor Ray nor gRPC; commands import them when they run.
    code = (
        "import sys, metaprune, metaprune.cli.main as m; m.build_parser();"
        "bad = [n for n in sys.modules if n.split('.')[0] in ('ray', 'grpc', 'torch')];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cli_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "metaprune.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("data", "bench"):
        assert command in out.stdout


def _imported_modules(tree: ast.AST, *, top_level_only: bool) -> set[str]:
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_dependencies_point_inward():
    # metaprune/ never imports Ray, gRPC, or the pipelines built on it. The CLI is the one
    # exception DESIGN.md allows, and only lazily, inside the command that runs a pipeline.
    forbidden = ("ray", "grpc", "metaprune.training", "metaprune.serving")
    offenders = []
    for path in (ROOT / "metaprune").rglob("*.py"):
        in_cli = path.parent.name == "cli"
        tree = ast.parse(path.read_text(), filename=str(path))
        for name in _imported_modules(tree, top_level_only=in_cli):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []


def test_public_names_resolve_to_the_design_functions():
    # DESIGN.md §5: `metaprune.prune` is the function, even once the engine package is imported.
    code = (
        "import metaprune, metaprune.pruning, metaprune.formats, metaprune.graph;"
        "assert callable(metaprune.prune) and metaprune.prune is metaprune.pruning.prune;"
        "assert callable(metaprune.load_model) and callable(metaprune.to_graph);"
        "assert issubclass(metaprune.UnsupportedModelError, ValueError)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
