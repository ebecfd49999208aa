"""Cohort fits (the paper's protocol): one object, several samples, one model."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from asign_sc.models import ASIGNModel
from asign_sc.pp._expression import resolve_known_sections
from asign_sc.tl import evaluate, fit_asign, impute

from .test_fit_impute import FAST, make_stack

pytestmark = pytest.mark.usefixtures("one_thread")


def cohort() -> ad.AnnData:
    """Two tumours ("P", "Q") of three sections each, in one AnnData with a sample column."""
    parts = []
    for name, seed in (("P", 0), ("Q", 1)):
        part = make_stack(seed=seed)
        part.obs_names = [f"{name}_{i}" for i in part.obs_names]
        part.obs["section"] = pd.Categorical([f"{name}{s}" for s in part.obs["section"]])
        part.obs["sample"] = name
        part.uns["spatial"] = {f"{name}{k}": v for k, v in part.uns["spatial"].items()}
        parts.append(part)
    graph = sp.block_diag([p.obsp["spatial3d_connectivities"] for p in parts], format="csr")
    spatial = {k: v for p in parts for k, v in p.uns["spatial"].items()}
    out = ad.concat(parts, merge="same")
    order = [f"{n}S{s}" for n in "PQ" for s in range(3)]
    out.obs["section"] = pd.Categorical(out.obs["section"].astype(str), categories=order)
    out.obsp["spatial3d_connectivities"] = graph
    out.uns["spatial"] = spatial
    return out


def with_other_counts(adata: ad.AnnData, section: str) -> ad.AnnData:
    """A copy whose measured profile differs in ``section`` (half the genes x 5)."""
    edited = adata.copy()
    x = edited.X.toarray()
    x[np.ix_((edited.obs["section"] == section).to_numpy(), np.arange(0, x.shape[1], 2))] *= 5
    edited.X = sp.csr_matrix(x)
    return edited


def test_one_model_for_a_cohort_imputes_each_sample_from_its_own_known_section():
    adata = cohort()
    # every section of the training sample P, one section of the target sample Q
    known = ["PS0", "PS1", "PS2", "QS0"]
    model = fit_asign(adata, known_sections=known, n_top_genes=10, device="cpu", **FAST)
    assert model.known_sections == known
    held_out = adata.obs.loc[model.run["validation_obs"][0]]
    assert set(held_out["section"]) <= set(known)  # from the measured sections of both samples
    assert set(held_out["sample"]) == {"P", "Q"}
    impute(adata, model)
    q = (adata.obs["sample"] == "Q").to_numpy()
    imputed = adata.obsm["asign"].to_numpy()
    assert np.isfinite(imputed).all()
    scores = evaluate(adata, sections=["QS1", "QS2"], baselines=("propagation",))
    overall = scores.query("section == 'all' and metric == 'pcc_gene'").set_index("method")
    assert overall.loc["asign", "value"] > 0.2
    # the propagation baseline never crosses samples: Q's unknown spots only see QS0
    edited = with_other_counts(adata, "PS1")
    genes = list(adata.obsm["asign"].columns)
    for data, key in ((adata, "a"), (edited, "b")):
        impute(
            data,
            method="propagation",
            known_sections=known,
            genes=genes,
            key_added=key,
            layer_added=key,
        )
    np.testing.assert_allclose(adata.obsm["a"].to_numpy()[q], edited.obsm["b"].to_numpy()[q])


def test_a_cohort_fit_by_sample_records_its_samples_and_imputes_within_each(tmp_path):
    adata = cohort()
    known = {"P": ["PS0", "PS1", "PS2"], "Q": "QS1"}
    model = fit_asign(
        adata, known_sections=known, sample_key="sample", n_top_genes=10, device="cpu", **FAST
    )
    assert model.known_sections == ["PS0", "PS1", "PS2", "QS1"]
    assert model.sample_key == "sample"
    assert model.samples == {"P": ["PS0", "PS1", "PS2"], "Q": ["QS1"]}
    recorded = adata.uns["asign"]["fit"]
    assert recorded["sample_key"] == "sample"
    assert {k: list(v) for k, v in recorded["samples"].items()} == model.samples
    loaded = ASIGNModel.load(model.save(tmp_path / "model"))
    assert (loaded.sample_key, loaded.samples) == ("sample", model.samples)
    # the model's imputation of Q reads Q's measured section only: P's counts do not matter
    edited = with_other_counts(adata, "PS1")
    q = (adata.obs["sample"] == "Q").to_numpy()
    for data in (adata, edited):
        impute(data, model, sample_key="sample", device="cpu")
    np.testing.assert_allclose(
        adata.obsm["asign"].to_numpy()[q], edited.obsm["asign"].to_numpy()[q], rtol=1e-5
    )
    assert not np.allclose(adata.obsm["asign"].to_numpy()[~q], edited.obsm["asign"].to_numpy()[~q])
    # a baseline with sample_key draws on the known spots of the spot's own sample only
    for data in (adata, edited):
        impute(
            data,
            method="similarity",
            known_sections=model.known_sections,
            genes=model.genes,
            sample_key="sample",
            key_added="sim",
            layer_added="sim",
        )
    np.testing.assert_allclose(adata.obsm["sim"].to_numpy()[q], edited.obsm["sim"].to_numpy()[q])


def test_a_list_of_sections_is_grouped_by_sample():
    stack, names, samples = resolve_known_sections(
        cohort(), ["QS0", "PS0", "PS1"], sample_key="sample"
    )
    assert names == ["QS0", "PS0", "PS1"] and samples == {"P": ["PS0", "PS1"], "Q": ["QS0"]}
    assert [s.sample for s in stack][:1] == ["P"]
    _, names, samples = resolve_known_sections(cohort(), "PS0")
    assert names == ["PS0"] and samples is None


@pytest.mark.parametrize(
    ("known", "sample_key", "match"),
    [
        ({"P": "PS0", "Q": "QS0"}, None, "pass sample_key="),
        (
            {"P": "PS0", "R": "RS0"},
            "sample",
            r"sample\(s\) \['R'\] that obs\['sample'\] does not have",
        ),
        ({"P": ["PS0", "QS1"], "Q": "QS0"}, "sample", r"\{'QS1': 'Q'\} .* belong to other samples"),
        ({"P": [], "Q": "QS0"}, "sample", r"known_sections\['P'\] = \[\]: no section given"),
        (
            {"P": ["PS0", "PS1"]},
            "sample",
            r"Sample\(s\) \['Q'\] .* have no known section.*Q: \['QS0'",
        ),
        (["PS0", "PS1"], "sample", r"Sample\(s\) \['Q'\]"),
        (["PS0", "PS0", "QS0"], "sample", r"names \['PS0'\] more than once"),
        (["PS0", "XS9"], "sample", "are not sections of the stack"),
        ({"P": "PS0", "Q": "QS0"}, "patient", r"obs\['patient'\] is missing"),
    ],
)
def test_cohort_known_sections_are_checked(known, sample_key, match):
    with pytest.raises(ValueError, match=match):
        fit_asign(cohort(), known_sections=known, sample_key=sample_key, epochs=1, device="cpu")
