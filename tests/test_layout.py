"""The tree tells a newcomer where things are: package docstrings list their modules, the shipped code holds no
test hooks, families resolve through the registry, and the CPU launch patches fail loudly on a library change."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [REPO / "data", REPO / "train"]


def packages() -> list[Path]:
    return sorted(p.parent for root in SHIPPED for p in root.rglob("__init__.py"))


@pytest.mark.parametrize("package", packages(), ids=lambda p: str(p.relative_to(REPO)))
def test_each_package_docstring_names_exactly_its_modules_and_subpackages(package):
    docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    assert docstring, f"{package} has no opening docstring"
    if package.name == "families":  # documents the interface; its modules are the registry's entries
        return
    named = set(re.findall(r"\b([a-z_][a-z0-9_]*(?:\.py|/))", docstring))
    present = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    present |= {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert present <= named, f"{package}: not described: {sorted(present - named)}"
    assert {n for n in named if n.endswith(".py") or n.endswith("/")} <= present, (
        f"{package}: described but missing: {sorted(named - present)}"
    )


def imported_modules(source: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_shipped_code_imports_no_test_module_and_reads_no_fault_variable():
    shipped = [p for root in SHIPPED for p in root.rglob("*.py")]
    assert len(shipped) > 30
    for path in shipped:
        source = path.read_text()
        assert not [m for m in imported_modules(source) if m.split(".")[0] == "tests"], path
        assert "VIDTUNE_FAULT" not in source, path


def test_every_registered_family_resolves_to_a_family_that_covers_its_model_type():
    from vidtune.data.families import FAMILIES, ModelFamily, family_for

    for model_type in FAMILIES:
        family = family_for(model_type)
        assert isinstance(family, ModelFamily) and model_type in family.model_types
    with pytest.raises(ValueError, match="not supported yet"):
        family_for("no_such_model")


def test_the_cpu_launch_patch_fails_loudly_when_what_it_patches_is_gone(monkeypatch):
    from accelerate.state import PartialState

    from vidtune.train.training import cpu_launch

    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cpu_launch.launched_without_gpus()  # no CUDA here: the patch would be active
    monkeypatch.delattr(PartialState, "_prepare_backend")
    with pytest.raises(cpu_launch.LibraryChanged, match="_prepare_backend"):
        cpu_launch.use_cpu_process_group()


def test_the_deepspeed_shm_patch_fails_loudly_when_the_op_table_changed(monkeypatch):
    import deepspeed.ops

    from vidtune.train.training import cpu_launch

    monkeypatch.setattr(deepspeed.ops, "__compatible_ops__", {"some_other_op": True})
    with pytest.raises(cpu_launch.LibraryChanged, match="deepspeed_shm_comm"):
        cpu_launch.skip_deepspeed_shm_build()


def test_every_recipe_folder_ships_with_the_package():
    """A recipe folder missing from pyproject's packages and package-data is left out of a wheel (`pip install
    vidtune` without -e), and `vidtune train FOLDER/...` then finds no recipe (recipes/internvl3_5_8b was)."""
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {f"vidtune.recipes.{p.parent.name}" for p in (REPO / "recipes").glob("*/*.yaml")}
    assert folders <= set(setuptools["packages"]), sorted(folders - set(setuptools["packages"]))
    assert folders <= set(setuptools["package-data"]), sorted(folders - set(setuptools["package-data"]))
