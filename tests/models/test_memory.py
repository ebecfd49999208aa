from __future__ import annotations

import numpy as np
import pytest

from asign_sc.models import TrainingConfig
from asign_sc.models._memory import (
    GB,
    TRAINING_FACTOR,
    InsufficientMemoryError,
    MemoryEstimate,
    available_memory,
    check_memory,
    memory_budget,
    network_bytes,
)
from asign_sc.models._training import TrainingPlan

from .conftest import Toy, toy_plan

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {
    "dims": {"spot_dim": 64, "region_dim": 64, "global_dim": 64},
    "n_tokens": {"region": 9, "global": 9},
    "n_genes": 250,
    "hidden_dim": 128,
    "n_heads": 4,
    "n_gat_layers": 3,
    "n_iterations": 10,
}


def test_estimates_grow_with_the_settings_that_drive_them():
    base = network_bytes(10_000, 100_000, training=True, **SIZES)
    assert network_bytes(20_000, 200_000, training=True, **SIZES).total == pytest.approx(
        2 * base.total
    )
    more_tokens = {**SIZES, "n_tokens": {"region": 36, "global": 36}}
    assert (
        network_bytes(10_000, 100_000, training=True, **more_tokens).parts["fusion"]
        > 3 * base.parts["fusion"]
    )
    # inference keeps the largest stage only, training every stage (TRAINING_FACTOR x)
    inference = network_bytes(10_000, 100_000, training=False, **SIZES)
    forward_sum = base.total / TRAINING_FACTOR
    assert inference.total < 0.7 * forward_sum
    # a 10 x 5,000-spot stack trains full-graph within a few GB
    assert base.total < 8 * GB
    # GATv2 keeps more per edge than GAT (its attention reads a per-edge hidden vector)
    v2 = network_bytes(10_000, 100_000, training=True, gat_variant="gatv2", **SIZES)
    assert v2.parts["graph_attention"] > 1.4 * base.parts["graph_attention"]
    assert v2.parts["fusion"] == base.parts["fusion"]


def test_check_memory_names_the_largest_part_and_its_setting():
    check_memory(MemoryEstimate({"fusion": 10.0}), 100, what="x")
    with pytest.raises(InsufficientMemoryError, match=r"batch_size.*n_components") as info:
        check_memory(MemoryEstimate({"fusion": 3 * GB, "propagation": GB}), 2 * GB, what="Training")
    assert "4.00 GB" in str(info.value) and "fusion" in str(info.value)
    with pytest.raises(InsufficientMemoryError, match="n_top_genes"):
        check_memory(MemoryEstimate({"propagation": 3 * GB}), GB, what="Prediction")
    assert isinstance(InsufficientMemoryError("x"), MemoryError)


def test_budget_is_the_setting_or_the_available_memory():
    assert memory_budget(0.5) == GB // 2
    assert memory_budget(None) == pytest.approx(available_memory(), rel=0.2)
    assert available_memory() > 0


def _plan(toy: Toy, config: TrainingConfig, batch_size: int | None) -> TrainingPlan:
    n_known = int(toy.known.sum())
    return toy_plan(
        toy,
        config,
        pool_pos=np.arange(4, n_known),
        val_pos=np.arange(4),
        rng=np.random.default_rng(0),
        batch_size=batch_size,
    )


def test_training_fails_before_any_step_when_over_budget():
    toy = Toy(n=90)
    tiny = TrainingConfig(max_memory_gb=1e-6, early_stopping=False)
    with pytest.raises(InsufficientMemoryError, match=r"Full-graph training on 90 spots"):
        _plan(toy, tiny, None)
    with pytest.raises(InsufficientMemoryError, match=r"batch_size=32"):
        _plan(toy, tiny, 32)
    plan = _plan(toy, TrainingConfig(max_memory_gb=1.0, early_stopping=False), 32)
    assert 0 < plan.memory_estimate().total < GB


def test_reading_too_wide_features_fails_before_reading(monkeypatch):
    import anndata as ad

    from asign_sc._stack import resolve_stack
    from asign_sc.models import StackData

    n = 40
    adata = ad.AnnData(np.zeros((n, 2), dtype=np.float32))
    adata.obs["section"] = np.repeat(["S0", "S1"], n // 2)
    adata.obsm["spatial"] = np.random.default_rng(0).uniform(size=(n, 2))
    adata.uns["spatial"] = {
        s: {"scalefactors": {"spot_diameter_fullres": 1.0}} for s in ("S0", "S1")
    }
    adata.obsm["X_asign_spot"] = np.zeros((n, 1280), dtype=np.float16)
    adata.obsm["X_asign_region_tokens"] = np.zeros((n, 9, 1280), dtype=np.float16)
    adata.obsm["X_asign_global_tokens"] = np.zeros((n, 9, 1280), dtype=np.float16)
    stack = resolve_stack(adata)
    with pytest.raises(InsufficientMemoryError, match=r"extract_features\(n_components"):
        StackData.from_table(
            adata,
            stack,
            features_key="asign",
            graph_key="spatial3d",
            standardize="section",
            max_memory_gb=1e-4,
        )


def test_config_validates_batch_size_and_budget():
    assert TrainingConfig().batch_size == "auto"
    assert TrainingConfig(batch_size=None).batch_size is None
    for bad in (0, 8, True, 64.0, "all"):
        with pytest.raises(ValueError, match="batch_size"):
            TrainingConfig(batch_size=bad)
    for bad in (0, -1.0, True, "4GB"):
        with pytest.raises(ValueError, match="max_memory_gb"):
            TrainingConfig(max_memory_gb=bad)
    config = TrainingConfig(batch_size=256, max_memory_gb=2.5)
    assert TrainingConfig.from_dict(config.to_dict()) == config


def test_estimates_follow_the_networks_blocks_and_prediction_keeps_one_step():
    plain = {**SIZES, "cross_attention": False, "graph_attention": False}
    few, many = (network_bytes(10_000, k, training=True, **plain) for k in (10_000, 500_000))
    # spot-wise layers read no edges, mean-pooled tokens need no attention
    assert few.parts["graph_attention"] == many.parts["graph_attention"]
    full = network_bytes(10_000, 100_000, training=True, **SIZES)
    assert few.parts["fusion"] < 0.5 * full.parts["fusion"]
    # averaging projected tokens keeps one projection per token (models saved before)
    per_token = network_bytes(
        10_000, 10_000, training=True, token_pooling="project_then_mean", **plain
    )
    assert per_token.parts["fusion"] > 1.5 * few.parts["fusion"]
    # training keeps every propagation step for the backward pass, prediction one at a time
    longer = {**SIZES, "n_iterations": 20}
    grows = network_bytes(10_000, 0, training=True, **longer).parts["propagation"]
    assert grows > 1.8 * full.parts["propagation"]
    one = network_bytes(10_000, 0, training=False, **SIZES).parts["propagation"]
    assert network_bytes(10_000, 0, training=False, **longer).parts["propagation"] == one
    assert one < 0.2 * full.parts["propagation"]
