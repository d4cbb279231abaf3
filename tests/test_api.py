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


# fresh; the API loaded by another name; a submodule imported first
@pytest.mark.parametrize("first", ["", "xkd.run", "import xkd.sweep.plan; xkd.build_model"])
def test_functions_named_like_their_modules_are_the_functions(first):
    # `xkd.sweep(...)` from the README was a TypeError: importing the submodule xkd.sweep set
    # the package's attribute to the module
    code = (
        f"import inspect, xkd\n{first}\n"
        "for name in ('compare', 'explain_images', 'sweep'):\n"
        "    assert inspect.isfunction(getattr(xkd, name)), (name, getattr(xkd, name))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
