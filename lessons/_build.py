"""Turn lesson notebooks into editable text and back, and run them to save their outputs.

The notebooks in lessons/ are the source of truth (edit them in Jupyter if you like).  For editing
in a text editor, or reviewing a diff, a notebook converts to the "percent" format and back:
``# %%`` starts a code cell, ``# %% [markdown]`` a markdown cell whose lines are markdown
commented out with ``# `` (as jupytext writes them, so the file stays valid Python); the
comment marks are removed on import and added on export.

    python lessons/_build.py export 02 > /tmp/02_convolution.py    # notebook -> text (no outputs)
    python lessons/_build.py import /tmp/02_convolution.py --run   # text -> lessons/02_convolution.ipynb
    python lessons/_build.py run                                   # run every notebook, save outputs
    python lessons/_build.py run 03 05                             # only those lessons
    python lessons/_build.py run 08 --full                         # full mode (long training)

Running uses nbclient with the "python3" kernel, lessons/ as working directory and
``MINIMASK_QUICK=1`` (small sizes, few repeats), exactly as ``tests/test_lessons.py`` does, so the
outputs committed are what CI sees.  The lessons draw their figures at 80 dpi to stay small.
The lessons that train, 08 to 11, are committed from a *full* run instead (``--full``: no
``MINIMASK_QUICK``, no time limit per cell), so their figures show a trained model; each
notebook's header says which mode its outputs come from, and with how many iterations.  The
full runs take, by the times the lessons print (08 on a quiet 2-core AMD EPYC, 10 and 11 on a
2-core machine shared with other programs): 08 about 7 minutes (800 iterations), 10 141
minutes of training by the trainer's clocks for its 21 runs of 400 iterations (7 rows x 3
seeds), trained two at a time with one thread each, and 11 about 12 minutes (2000 iterations); 09 trains nothing (it evaluates 08's last checkpoint, so run it after
08).  ``lessons/README.md`` has the
table.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


def parse_percent(text):
    """[(kind, source)] from percent-format text; kind is "code" or "markdown"."""
    cells, kind, lines = [], None, []

    def flush():
        body = "\n".join(lines).strip("\n")
        if kind is not None and body.strip():
            cells.append((kind, body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind == "markdown":
            lines.append(uncomment(line))
        else:
            lines.append(line)
    flush()
    return cells


def uncomment(line):
    """A markdown line of the percent format without its ``# `` (a bare ``#`` is an empty line)."""
    if line.startswith("# "):
        return line[2:]
    return "" if line == "#" else line


def to_percent(nb):
    """The percent-format text of a notebook's cells (outputs dropped)."""
    parts = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            body = "\n".join(("# " + line) if line else "#" for line in cell.source.splitlines())
            parts.append(f"# %% [markdown]\n{body}\n")
        else:
            parts.append(f"# %%\n{cell.source}\n")
    return "\n".join(parts)


def from_percent(text):
    """A notebook (no outputs) from percent-format text."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, body in parse_percent(text):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(make(body))
    return nb


def execute(nb, timeout=300, full=False):
    """Run ``nb`` in place, top to bottom, with lessons/ as working directory: in quick mode, or
    with ``full`` in full mode and no time limit per cell."""
    from nbclient import NotebookClient

    if full:
        os.environ.pop("MINIMASK_QUICK", None)
        timeout = None
    else:
        os.environ["MINIMASK_QUICK"] = "1"  # the kernel inherits this environment
    client = NotebookClient(nb, kernel_name="python3", timeout=timeout,
                            resources={"metadata": {"path": str(HERE)}})
    client.execute()
    for cell in nb.cells:  # timestamps would change on every run: keep diffs to real changes
        cell.metadata.pop("execution", None)
    return nb


def find(prefixes):
    """The lesson notebooks whose file names start with one of ``prefixes`` (all if none)."""
    paths = sorted(HERE.glob("[0-9]*.ipynb"))
    return [p for p in paths if not prefixes or any(p.name.startswith(x) for x in prefixes)]


def run_and_save(nb, path, full=False):
    t0 = time.perf_counter()
    execute(nb, full=full)
    nbformat.write(nb, path)
    print(f"{path.name}: ran in {time.perf_counter() - t0:.1f} s, "
          f"{path.stat().st_size / 1e3:.0f} kB with outputs", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="print a notebook as percent-format text")
    p.add_argument("lesson", help="file name or its first characters, e.g. 02")
    p = sub.add_parser("import", help="write lessons/<stem>.ipynb from a percent-format file")
    p.add_argument("source", type=Path)
    p.add_argument("--run", action="store_true", help="also run it and save the outputs")
    p.add_argument("--full", action="store_true", help="run in full mode (no MINIMASK_QUICK)")
    p = sub.add_parser("run", help="run notebooks top to bottom and save their outputs")
    p.add_argument("lessons", nargs="*", help="file names or their first characters (default: all)")
    p.add_argument("--full", action="store_true", help="run in full mode (no MINIMASK_QUICK)")
    args = parser.parse_args(argv)

    if args.command == "export":
        found = find([args.lesson])
        if len(found) != 1:
            parser.error(f"{args.lesson!r} matches {len(found)} notebooks: {[p.name for p in found]}")
        sys.stdout.write(to_percent(nbformat.read(found[0], as_version=4)))
    elif args.command == "import":
        nb, out = from_percent(args.source.read_text()), HERE / f"{args.source.stem}.ipynb"
        if args.run:
            run_and_save(nb, out, full=args.full)
        else:
            nbformat.write(nb, out)
        print(f"wrote {out}", file=sys.stderr)
    else:
        for path in find(args.lessons):
            run_and_save(nbformat.read(path, as_version=4), path, full=args.full)


if __name__ == "__main__":
    main()
