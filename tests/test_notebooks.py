"""Every notebook under notebooks/ runs top to bottom without an error (nbclient).

The kernel gets JAXDIFF_NOTEBOOK_QUICK=1: each notebook then runs its every cell on smaller
sizes (fewer images, steps, tolerances and tuning iterations; the same code paths and the
same assertions). The committed outputs are those of the full-size run."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("JAXDIFF_NOTEBOOK_QUICK", "1")      # the kernel inherits the environment
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors


def test_notebooks_present():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_sampling.ipynb", "02_digits.ipynb", "03_paradigms.ipynb", "04_timetuner.ipynb",
            "05_faster_diffusion.ipynb"} <= names
