"""The notebooks in colabs/ run as a person runs them: top to bottom, in a fresh kernel.

Every colabs/*.ipynb (a new one is picked up by the glob) is executed by nbclient in a fresh
IPython kernel of this interpreter: the kernel spec is written from sys.executable into the
test's tmp_path, so no kernel installed by hand is needed or used, and an appended cell checks
that the kernel ran this interpreter. The working directory is the repository root,
QDC_NOTEBOOK_WORKDIR points the notebooks' outputs at tmp_path, and the test's fake-device
XLA flags are left out (a notebook sees the machine's real devices). A cell that raises fails
the test (nbclient's CellExecutionError names the cell and shows its traceback).

Each notebook must also show what it is for (figures, tables: `_EXPECTED`), and finish within
`BUDGET_S` (its target is 2 minutes on 2 CPU cores; the budget leaves room for a loaded
machine, as under `pytest -n 2`).
"""
import glob
import json
import os
import sys
import time

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colabs", "*.ipynb")))
BUDGET_S = 300
# Per notebook: (PNG figures shown at least, texts its outputs must contain); a notebook not
# named here is still run, and must still not fail.
_EXPECTED = {
    "lab_quickstart.ipynb": (1, ["skills:", "wrong intended answer", "'pass@4':",
                                 "'maj@4':", "'diversity/exact_all':"]),
    "sparq_explorer.ipynb": (2, ["| niche (skill-set) | problems | best quality |",
                                 "'qd_score':", "# SPARQ report"]),
    "scaling_laws.ipynb": (4, ["## Data-size exponents (figure 2.2)",
                               "## The manifold check", "## Table 2.1",
                               "'dimension':", "predicted data exponent"]),
    "rl_results.ipynb": (3, ["| SFT student (shipped) |", "| EI smoke (live) (k=",
                             "### Test split `ood`"]),
}
_PROBE = "import sys; print('KERNEL_PYTHON=' + sys.executable)"
# Environment that would point a notebook elsewhere than its defaults.
_NOTEBOOK_VARS = ("QDC_NOTEBOOK_WORKDIR", "QDC_SPARQ_RUN", "QDC_SCALING_RESULTS",
                  "QDC_RL_RESULTS")


def _ids(paths):
  return [os.path.basename(p) for p in paths]


def _texts(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      if o.get("output_type") == "stream":
        out.append(o.get("text", ""))
      for key in ("text/plain", "text/markdown"):
        out.append(o.get("data", {}).get(key, ""))
  return "\n".join(out)


def _images(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_the_notebooks_are_found():
  assert set(_EXPECTED) <= set(_ids(NOTEBOOKS)), "a notebook of colabs/ is missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_committed_notebook_is_stripped_and_installs_only_on_colab(path):
  nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
  nbformat.validate(nb)
  assert nb.nbformat == 4 and nb.metadata.kernelspec.name == "python3"
  code = [c for c in nb.cells if c.cell_type == "code"]
  for c in code:  # committed without outputs: diffs show code, not results
    assert c.outputs == [] and c.execution_count is None, c.source[:80]
  assert "if \"google.colab\" in sys.modules:" in code[0].source  # the install cell, first
  assert any("import qdc_jax" in c.source or "from qdc_jax" in c.source for c in code)
  assert nb.cells[0].cell_type == "markdown"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_from_a_fresh_kernel(path, tmp_path):
  name = os.path.basename(path)
  nb = nbformat.read(path, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(_PROBE))
  spec_dir = write_kernel_spec(str(tmp_path / "kernels" / "qdc_notebook_test"))
  with open(os.path.join(spec_dir, "kernel.json")) as f:
    assert json.load(f)["argv"][0] == sys.executable
  km = AsyncKernelManager(kernel_name="qdc_notebook_test", kernel_spec_manager=(
      KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)))
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",) + _NOTEBOOK_VARS}
  env["QDC_NOTEBOOK_WORKDIR"] = str(tmp_path / "work")
  os.makedirs(env["QDC_NOTEBOOK_WORKDIR"])
  client = NotebookClient(nb, km=km, timeout=BUDGET_S, startup_timeout=120,
                          resources={"metadata": {"path": REPO}})
  start = time.perf_counter()
  client.execute(env=env)  # raises CellExecutionError on the first failing cell
  seconds = time.perf_counter() - start
  print(f"{name}: {seconds:.1f} s")
  assert seconds < BUDGET_S, f"{name} took {seconds:.0f} s"
  texts = _texts(nb)
  assert f"KERNEL_PYTHON={sys.executable}" in texts
  min_images, wanted = _EXPECTED.get(name, (0, []))
  assert _images(nb) >= min_images, f"{name}: {_images(nb)} figures shown"
  for text in wanted:
    assert text in texts, f"{name} shows no {text!r}"
