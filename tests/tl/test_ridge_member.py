"""The linear member of ``impute(method="asign")``: ridge + label spreading beside the networks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from asign_sc.models import ArchitectureConfig, ASIGNModel
from asign_sc.tl import fit_asign, impute

from .test_fit_impute import FAST, SMALL, make_stack

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted():
    adata = make_stack()
    model = fit_asign(
        adata,
        known_sections=["S0"],
        device="cpu",
        **{**FAST, "architecture": ArchitectureConfig(**SMALL, ridge_member=0.0)},
    )
    return adata, model


def _imputed(adata, model, method="asign", key="x"):
    impute(adata, model, method=method, key_added=key, layer_added=key, device="cpu")
    return adata.obsm[key].to_numpy(), adata.obsm[f"{key}_uncertainty"].to_numpy()


def test_prediction_is_the_weighted_average_of_networks_and_ridge_spreading(fitted):
    adata, networks_only = fitted
    with_member = networks_only.copy()
    with_member.architecture = dataclasses.replace(networks_only.architecture, ridge_member=0.3)
    networks, spread = _imputed(adata, networks_only, key="networks")
    linear, _ = _imputed(adata, networks_only, method="ridge_propagation", key="linear")
    both, both_spread = _imputed(adata, with_member, key="both")
    np.testing.assert_allclose(both, 0.3 * linear + 0.7 * networks, rtol=1e-5, atol=1e-6)
    assert adata.uns["both"]["impute"]["ridge_member"] == 0.3
    # the linear member is deterministic: the networks' spread shrinks by their weight
    np.testing.assert_allclose(both_spread, 0.7 * spread, rtol=1e-5, atol=1e-6, equal_nan=True)
    known = (adata.obs["section"] == "S0").to_numpy()
    np.testing.assert_allclose(both[known], networks[known], rtol=1e-6)  # measured values
    assert not np.allclose(both[~known], networks[~known])


def test_network_method_never_uses_the_linear_member(fitted):
    adata, networks_only = fitted
    with_member = networks_only.copy()
    with_member.architecture = dataclasses.replace(networks_only.architecture, ridge_member=0.5)
    alone, _ = _imputed(adata, networks_only, method="network", key="a")
    member, _ = _imputed(adata, with_member, method="network", key="b")
    np.testing.assert_array_equal(alone, member)


def test_models_saved_before_the_member_existed_keep_predicting_networks_only(fitted, tmp_path):
    _, model = fitted
    settings = model.settings
    del settings["architecture"]["ridge_member"]
    assert ASIGNModel.from_settings(settings).architecture.ridge_member == 0.0
    assert ArchitectureConfig().ridge_member == 0.5  # new models use it


@pytest.mark.parametrize("weight", [1.0, -0.1, True])
def test_ridge_member_outside_zero_one_is_refused(weight):
    with pytest.raises(ValueError, match=r"ridge_member must lie in \[0, 1\)"):
        ArchitectureConfig(ridge_member=weight)
