"""The package's public names: ``xkd.<name>`` is what ``xkd.api`` exports, whatever was imported first."""

from __future__ import annotations

import subprocess
import sys

import pytest

import xkd
import xkd.api


def test_every_exported_name_is_the_api_object():
    for name in xkd.api.__all__:
        assert getattr(xkd, name) is getattr(xkd.api, name), name


# fresh; the API loaded by another name; the API's module imported; submodules imported first
@pytest.mark.parametrize(
    "first",
    ["", "xkd.run", "import xkd.api", "import xkd.sweeps.plan; xkd.build_model", "from xkd.comparison import stat"],
)
def test_the_api_functions_are_functions_whatever_was_imported_first(first):
    # `xkd.sweep(...)` from the README was a TypeError: the function's module had its name, and
    # importing it (the API itself did) set the package's attribute to the module
    code = (
        f"import inspect, xkd\n{first}\n"
        "for name in ('compare', 'explain_images', 'sweep'):\n"
        "    assert inspect.isfunction(getattr(xkd, name)), (name, getattr(xkd, name))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
