"""The README's measuring example runs as written (on the packaged MiniLM) and prints a real table."""

import re
from pathlib import Path


def test_readme_measure_example_runs(capsys):
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    assert len(block.strip().splitlines()) <= 12
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    out = capsys.readouterr().out
    assert "overall" in out and "encoder.layer.5" in out
    assert 0 < ns["report"].overall <= 1
