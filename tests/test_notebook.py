"""A scientist's notebook, run through a real Jupyter kernel (nbclient): what works in a
script works in cells, including code that lives only in the notebook and a helper module
beside it that is not installed."""

from __future__ import annotations

import json
import uuid

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def _text(cell) -> str:
    """Everything a cell showed as text: its result, its prints, its stderr."""
    parts = []
    for output in cell.outputs:
        if output.get("output_type") == "stream":
            parts.append(output["text"])
        elif "text/plain" in output.get("data", {}):
            parts.append(output["data"]["text/plain"])
    return "".join(parts)


def test_a_notebook_runs_its_own_code_on_the_workers(tmp_path, backend):
    helpers = f"nbhelpers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{helpers}.py").write_text("def double(x):\n    return 2 * x\n")
    cells = [
        # 0: set up, as a user would (the helper module sits beside the notebook)
        f"import lambdafutures\nfrom lambdafutures import LambdaExecutor\nimport {helpers}\n"
        f"ex = LambdaExecutor(max_workers=2, backend={backend!r})",
        # 1: a function defined in the notebook
        "def square(x):\n    return x * x\nlist(ex.map(square, range(5)))",
        # 2: a class defined in the notebook
        "class Shift:\n    def __init__(self, k):\n        self.k = k\n"
        "    def __call__(self, x):\n        return x + self.k\nex.submit(Shift(3), 4).result()",
        # 3: a closure
        "def times(k):\n    return lambda x: x * k\nex.submit(times(6), 7).result()",
        # 4: the helper module used through its name, on the first submit that needs it
        f"def use_helper(x):\n    return {helpers}.double(x)\nex.submit(use_helper, 21).result()",
        # 5: a global changed between submits: each task sees the value at its submit
        "SCALE = 2\ndef scaled(x):\n    return x * SCALE\na = ex.submit(scaled, 5).result()\n"
        "SCALE = 3\n(a, ex.submit(scaled, 5).result())",
        # 6: as_completed with a progress bar
        "from concurrent.futures import as_completed\n"
        "from lambdafutures.observe import progress\n"
        "futures = [ex.submit(square, i) for i in range(10)]\n"
        "sorted(f.result() for f in progress(as_completed(futures), total=10))",
        # 7: a figure, returned and shown
        "from lambdafutures.observe import timeline\ntimeline(futures)",
        # 8: what a task printed
        "def chatty():\n    print('hello from the worker')\n    return 1\n"
        "f = ex.submit(chatty)\nf.result()\nprint(lambdafutures.output_of(f), end='')",
        # 9: done
        "ex.shutdown()\n'closed'",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(notebook, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    shown = [_text(cell) for cell in notebook.cells]
    assert shown[1] == "[0, 1, 4, 9, 16]"
    assert shown[2] == "7"
    assert shown[3] == "42"
    assert shown[4] == "42"
    assert shown[5] == "(10, 15)"
    assert "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in shown[6]
    assert "IProgress" not in shown[6]
    images = [o for o in notebook.cells[7].outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, json.dumps(notebook.cells[7].outputs)[:500]
    assert shown[8] == "hello from the worker\n"
    assert shown[9] == "'closed'"
