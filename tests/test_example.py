"""The README's main job: the fan-out example on the embedded default cluster."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fanout_search.py"


def test_the_fanout_example_serves_every_text_and_answers_the_queries():
    run = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "20 texts embedded" in out
    assert "-> Paris is the capital of France." in out
    assert "-> Bread rises because yeast produces carbon dioxide." in out
    served = next(line for line in out.splitlines() if line.startswith("served:"))
    assert "cpu0" in served
    # On a machine whose QNN HTP backend loads, the long texts are tried there first.
    if "npu0" in out.split("MODELS")[0]:
        assert "failed over from npu0 (unsupported)" in out
