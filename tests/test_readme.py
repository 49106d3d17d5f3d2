"""The README's Python API example runs as written (on the bundled data)."""
import re
from pathlib import Path


import sirobust

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, trained_cnn, fmnist_test):
    block = re.search(r"## Python API\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(block.strip().splitlines()) == 5
    monkeypatch.setattr(sirobust, "load", lambda path: trained_cnn)  # the demo's run folder is not there in tests
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    scope = {"x": x, "y": y}
    exec(block, scope)
    assert (scope["x_adv"] - x).abs().max() <= 0.1 + 1e-6
    report = scope["report"]
    assert isinstance(report, sirobust.Report) and set(report.attacks) == {"pgd", "pgd-cw", "pgd-dlr", "si-pgd"}
    assert report.worst_case_acc <= report.clean_acc
