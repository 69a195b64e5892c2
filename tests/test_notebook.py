"""notebooks/quickstart.ipynb runs top to bottom at a tiny size and draws its figures.

The notebook is executed with nbclient in a kernel of this very interpreter (a kernel spec
written to a temporary JUPYTER_PATH points at ``sys.executable``), with the parameters overridden
the way papermill does it: a cell inserted right after the cell tagged ``parameters``.
"""
import json
import os
import sys

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
KERNEL = "sphere-jax-test"
# cnn_218k's VALID convolutions need a 23 x 23 input, hence L = 12 (the grid is 2L x 2L - 1).
TINY = dict(L=12, STEPS=4, N_TRAIN=64, N_TEST=16, SOURCE="synthetic")
FIGURES = ("samples.png", "predictions_s2cnn_seg_small.png", "predictions_cnn_218k.png")


def _kernel_spec(tmp_path, monkeypatch):
    """A kernel spec named KERNEL that runs ipykernel in sys.executable, found first on JUPYTER_PATH."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "sphere_jax test",
        "language": "python",
        "env": {"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    from jupyter_client.kernelspec import KernelSpecManager

    found = KernelSpecManager().get_kernel_spec(KERNEL)
    assert found.argv[0] == sys.executable


def _inject_parameters(nb, params):
    """Papermill-style: a cell tagged injected-parameters right after the parameters cell."""
    code_cells = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == code_cells[:1], "the first code cell (and only it) must be tagged 'parameters'"
    names = {line.split("=")[0].strip() for line in nb.cells[tagged[0]].source.splitlines() if "=" in line}
    assert set(params) | {"WORKDIR"} <= names, f"parameters cell lacks {set(params) - names}"
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, cell)


def _png_ok(path):
    import matplotlib.image

    assert os.path.getsize(path) > 10_000, f"{path} is only {os.path.getsize(path)} bytes"
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 200, img.shape
    assert float(np.std(img[..., :3])) > 0.05, f"{path} is (nearly) blank"


def test_quickstart_notebook_runs_at_tiny_size(tmp_path, monkeypatch):
    _kernel_spec(tmp_path, monkeypatch)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    workdir = tmp_path / "runs"
    _inject_parameters(nb, dict(TINY, WORKDIR=str(workdir)))
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "using SYNTHETIC digits" in text
    assert "Traceback" not in text
    # the figures exist as files and appear in the executed notebook
    for name in FIGURES:
        _png_ok(workdir / name)
    images = [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]
    assert len(images) >= len(FIGURES)
    # both runs trained, checkpointed, and were evaluated on rotated and canonical digits
    runs = sorted(p for p in workdir.iterdir() if (p / "config.json").is_file())
    assert [p.name.split("_")[0] for p in runs] == ["cnn", "s2cnn"]
    for run in runs:
        assert (run / "best").is_dir() and (run / "checkpoints").is_dir()
        tests = [json.loads(line) for line in open(run / "metrics.jsonl") if '"test"' in line]
        assert {t["test_rotate"] for t in tests} == {True, False}
        _png_ok(run / "predictions_R.png")
        _png_ok(run / "predictions_NR.png")
    table = (workdir / "comparison.md").read_text().splitlines()
    assert len(table) == 4 and "s2cnn_seg_small" in table[2] and "cnn_218k" in table[3]
    markdown = [o for o in outputs if "text/markdown" in o.get("data", {})]
    assert any("| model |" in o.data["text/markdown"] for o in markdown)
