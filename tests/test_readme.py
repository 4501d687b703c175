"""The README's Python code blocks run as written (in a scratch folder holding the configs)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def python_blocks(readme: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)


@pytest.mark.parametrize("readme", ["README.md", "README.zh-CN.md"])
def test_both_readmes_hold_the_same_code(repo_path: str, readme: str) -> None:
    english = re.findall(r"```\w*\n(.*?)```", Path(repo_path, "README.md").read_text(), re.S)
    assert re.findall(r"```\w*\n(.*?)```", Path(repo_path, readme).read_text(), re.S) == english


@pytest.mark.parametrize("index", range(4))
def test_python_block_runs(tmp_path, repo_path: str, index: int) -> None:
    blocks = python_blocks(Path(repo_path, "README.md"))
    assert len(blocks) == 4, "update this test when the README gains a Python block"
    shutil.copytree(Path(repo_path, "configs"), tmp_path / "configs")
    script = tmp_path / "block.py"
    script.write_text(blocks[index])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}  # one torch thread
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs").is_dir()
