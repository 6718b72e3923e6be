"""The complete plugin and its test in docs/plugins.md work as written (run by pytest with the kit)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def doc_blocks() -> tuple[str, str]:
    """The plugin module and its test: the two Python blocks after "A complete plugin"."""
    text = (REPO / "docs" / "plugins.md").read_text()
    section = text[text.index("A complete plugin"):]
    plugin, test = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:2]
    return plugin, test


def test_documented_plugin_and_its_test_pass(tmp_path: Path) -> None:
    plugin, test = doc_blocks()
    (tmp_path / "cellseg1d_cellcount.py").write_text(plugin)
    (tmp_path / "test_cellcount.py").write_text(test)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "4 passed" in proc.stdout, proc.stdout[-2000:]
