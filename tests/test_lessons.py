"""The lessons run: every ``lessons/*.ipynb`` executes top to bottom without an error.

Each notebook is one test (lessons added later are picked up by the glob), run with nbclient
in a fresh "python3" kernel, with ``lessons/`` as working directory and ``MINIMASK_QUICK=1``
(the lessons shrink their sizes and repeats), as ``lessons/_build.py run`` does when it saves
the outputs that are committed.  A failing cell fails the test with the cell's error.

Besides running, each notebook must keep the shape every lesson promises: it opens with a
markdown cell, has markdown between its code cells, draws at least one figure, and closes with
exercises.
"""

from pathlib import Path

import pytest

LESSONS = Path(__file__).resolve().parent.parent / "lessons"
NOTEBOOKS = sorted(LESSONS.glob("*.ipynb"))
CELL_TIMEOUT = 180  # seconds per cell; the quick lessons take a few seconds each in all


def _requirements():
    """nbformat, nbclient and a "python3" Jupyter kernel; skip with the reason otherwise."""
    nbformat = pytest.importorskip("nbformat", reason="running the lessons needs nbformat")
    nbclient = pytest.importorskip("nbclient", reason="running the lessons needs nbclient")
    pytest.importorskip("ipykernel", reason="running the lessons needs ipykernel (the python3 kernel)")
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        pytest.skip("no 'python3' Jupyter kernel is installed (python -m ipykernel install --user)")
    return nbformat, nbclient


def test_lessons_exist():
    assert len(NOTEBOOKS) >= 4, f"expected the lesson notebooks in {LESSONS}, found {NOTEBOOKS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_markdown_is_markdown(path):
    """Markdown cells hold plain markdown: the percent format's ``# `` comment marks would make
    Jupyter show every line as a heading (lessons/_build.py removes them on import)."""
    nbformat = pytest.importorskip("nbformat", reason="reading the lessons needs nbformat")
    for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
        lines = [line for line in cell.source.splitlines() if line.strip()]
        if cell.cell_type == "markdown" and len(lines) > 1:
            assert not all(line.startswith("# ") or line == "#" for line in lines), \
                f"{path.name}, cell {i}: every line starts with '# ' (percent-format comments left in)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_lesson_runs(path, monkeypatch):
    nbformat, nbclient = _requirements()
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("MINIMASK_QUICK", "1")  # the kernel inherits this process's environment
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(LESSONS)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name}: a cell failed:\n{err}", pytrace=False)

    kinds = [c.cell_type for c in nb.cells]
    assert kinds[0] == "markdown", f"{path.name}: open with a markdown cell (what, and where in the paper)"
    assert kinds.count("markdown") >= kinds.count("code") // 2, f"{path.name}: too little text between code"
    figures = sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code"
                  for out in c.outputs)
    assert figures >= 1, f"{path.name} drew no figure"
    assert "exercises" in nb.cells[-1].source.lower(), f"{path.name} should close with exercises"
