"""In an executed notebook every pl call displays its figure exactly once, and INFO shows."""

from __future__ import annotations

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs the [test] extra")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs the [test] extra")
pytest.importorskip("ipykernel", reason="the notebook test needs the [test] extra")

SETUP = """\
import asign_sc as asg
sdata, truth = asg.datasets.synthetic_stack(
    n_sections=3, n_spots_per_section=40, image_size=128, n_genes=12
)
asg.tl.register_sections(sdata, matrices=truth.transforms)
asg.gr.build_3d_graph(sdata)
asg.tl.impute(sdata, method="overlap", known_sections=["S2"], n_top_genes=8)
asg.tl.evaluate(sdata, sections=["S1", "S3"], baselines=("propagation",))
gene = sdata.tables["table"].obsm["asign"].columns[0]
history = {"epoch": [0, 1, 2], "loss": [3.0, 2.0, 1.5], "val_loss": [3.1, 2.4, 2.0],
           "val_pcc": [0.1, 0.2, 0.3], "member": [0, 0, 0]}
"""

CALLS = [
    "asg.pl.sections(sdata, gene, max_side=64)",
    "asg.pl.registration(sdata, max_side=64)",
    "asg.pl.stack_3d(sdata, gene)",
    "asg.pl.metrics(sdata)",
    "asg.pl.training(history)",
    "fig = asg.pl.sections(sdata, gene, compare=None, img=False, show=False)",
]


@pytest.mark.slow
def test_each_plot_shows_one_image_and_steps_log_at_info(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(SETUP)] + [
        nbformat.v4.new_code_cell(code) for code in CALLS
    ]
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()
    setup, *plots = notebook.cells
    log = "".join(o.get("text", "") for o in setup.outputs if o.output_type == "stream")
    # the steps' INFO summary lines show by default, each once (impute names what it added)
    assert log.count("layers['asign']") == 1, log
    for cell in plots:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        results = [o for o in cell.outputs if o.output_type == "execute_result"]
        assert len(images) == 1, (cell.source, [o.output_type for o in cell.outputs])
        assert results == [], cell.source  # a shown figure is not also the cell's value
