"""The wheel's contents as pyproject.toml declares them: every package folder listed, py.typed shipped."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(ROOT, "pyproject.toml")


@pytest.fixture
def setuptools_config():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    if not os.path.exists(PYPROJECT):
        pytest.skip("no pyproject.toml: the installed package")
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def test_every_package_folder_is_listed(setuptools_config):
    # the list is explicit (kernels/ is mapped to fastdml.kernels): a new subpackage must be added to it,
    # or the wheel ships without it
    found = {"fastdml.kernels"}
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "fastdml")):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        if "__init__.py" in filenames:
            found.add(os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    missing = found - set(setuptools_config["packages"])
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {sorted(missing)}"


def test_py_typed_is_shipped(setuptools_config):
    assert os.path.exists(os.path.join(ROOT, "fastdml", "py.typed"))
    assert "py.typed" in setuptools_config["package-data"]["fastdml"]
