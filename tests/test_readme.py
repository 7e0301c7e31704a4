"""The README is a runnable contract: its Python snippets run and its commands exist."""

from __future__ import annotations

import re

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet-{i}" for i in range(len(SNIPPETS))])
def test_python_snippets_run(code):
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


def test_the_two_opening_commands_exist():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.DOTALL).group(1)
    scripts = re.findall(r"bash (scripts/\S+\.sh)", first_block)
    assert len(scripts) == 2
    for script in scripts:
        assert (REPO / script).is_file(), script
