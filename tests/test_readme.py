"""The README's walk-through runs as written (its asserts are the checks)."""

from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_walkthrough(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    text = README.read_text()
    assert text.index("make demo") < text.index("## ") and "make test" in text
    code = text.split("## Walk-through", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "model.onnx").is_file()
    plan = namespace["plan"]
    assert [i.name for i in plan.layers] == ["0.weight", "2.weight"]
