"""The README and docs are a runnable contract: their Python snippets run, the commands exist."""

from __future__ import annotations

import re

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()
DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
SNIPPETS = [
    (name, code)
    for name in DOCS
    for code in re.findall(r"```python\n(.*?)```", (REPO / name).read_text(), flags=re.DOTALL)
]


@pytest.mark.parametrize(
    "name, code", SNIPPETS, ids=[f"{name}-{i}" for i, (name, _) in enumerate(SNIPPETS)]
)
def test_python_snippets_run(name, code):
    exec(compile(code, name, "exec"), {"__name__": "__readme__"})


def test_the_two_opening_commands_exist():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.DOTALL).group(1)
    scripts = re.findall(r"bash (scripts/\S+\.sh)", first_block)
    assert len(scripts) == 2
    for script in scripts:
        assert (REPO / script).is_file(), script
