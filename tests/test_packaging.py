"""The package layout promised in DESIGN.md §1 holds."""

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


def test_library_does_not_import_ray_or_grpc():
    code = (
        "import sys, metaprune, metaprune.cli.main as m; m.build_parser();"
        "bad = [n for n in sys.modules if n.split('.')[0] in ('ray', 'grpc')];"
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
