"""fit_asign(devices=N): DistributedDataParallel over spawned CPU processes (gloo)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from asign_sc.models import ArchitectureConfig, DistributedTrainingError, TrainingConfig
from asign_sc.models._distributed import FAULT_ENV
from asign_sc.tl import fit_asign, impute

from .test_fit_impute import make_stack, per_gene_pcc, truth_of

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    # networks only (no linear member), so the comparison sees the training alone
    "architecture": ArchitectureConfig(hidden_dim=16, n_heads=2, n_gat_layers=2, ridge_member=0),
    "training": TrainingConfig(batch_size=32, patience=10),
    "epochs": 30,
    "n_models": 1,
    "n_top_genes": 20,
    "device": "cpu",
    "show_progress_bar": False,
}


def _unknown_pcc(adata, model) -> float:
    impute(adata, model, device="cpu")
    unknown = (adata.obs["section"] != "S1").to_numpy()
    pred = adata.obsm["asign"].to_numpy()[unknown]
    return per_gene_pcc(pred, truth_of(adata, model.genes)[unknown])


def _leftovers() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("asign_sc_ddp_*"))


@pytest.mark.slow
def test_two_processes_match_one_process():
    before = _leftovers()
    one, two = make_stack(), make_stack()
    model_one = fit_asign(one, known_sections=["S1"], devices=1, **TINY)
    model_two = fit_asign(two, known_sections=["S1"], devices=2, **TINY)
    # the same splits and tiles; each step of 2 processes averages 2 tiles' gradients
    assert model_two.run["validation_obs"] == model_one.run["validation_obs"]
    assert len(model_two.history) >= 1 and "fit" in two.uns["asign"]
    pcc_one, pcc_two = _unknown_pcc(one, model_one), _unknown_pcc(two, model_two)
    assert pcc_one > 0.3
    assert abs(pcc_one - pcc_two) < 0.02, (pcc_one, pcc_two)
    assert _leftovers() == before


@pytest.mark.slow
def test_a_dying_worker_fails_clearly_and_writes_nothing(monkeypatch):
    before = _leftovers()
    adata = make_stack()
    uns_before = {k: dict(v) if hasattr(v, "keys") else v for k, v in adata.uns.items()}
    monkeypatch.setenv(FAULT_ENV, "1")
    with pytest.raises(DistributedTrainingError, match=r"process 1 of 2 exited with code 3"):
        fit_asign(adata, known_sections=["S1"], devices=2, **TINY)
    assert "asign" not in adata.uns and set(adata.uns) == set(uns_before)
    assert _leftovers() == before


def test_device_count_errors_come_before_any_process_starts():
    adata = make_stack(n_sections=2, side=6)
    with pytest.raises(ValueError, match="devices must be a positive integer"):
        fit_asign(adata, known_sections=["S1"], devices=0, **TINY)
    with pytest.raises(ValueError, match="batch_size=None"):
        fit_asign(
            adata,
            known_sections=["S1"],
            devices=2,
            **{**TINY, "training": TrainingConfig(batch_size=None)},
        )
    assert "asign" not in adata.uns
