"""The README's API example runs as written."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make book") and first_block.splitlines()[1].startswith("make test")


def test_readme_api_example_runs(capsys):
    """Every python block, in order and in one namespace: the API tour, then the user-defined plan."""
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "torch.Size([2," in out
    assert out.rstrip().endswith("False")  # the user-defined plan changed the logits
