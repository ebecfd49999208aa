"""The training plan: validation splits, mini-batches and their subgraphs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from asign_sc import InvalidStackError
from asign_sc.models._training import split_validation


def grid(side: int = 20) -> np.ndarray:
    return np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2) * 100.0


def test_random_split_is_disjoint_and_covers_everything():
    val, pool = split_validation(400, 0.2, True, np.random.default_rng(0))
    assert len(val) == 80 and len(pool) == 320
    assert set(val).isdisjoint(pool) and set(val) | set(pool) == set(range(400))


def test_blocked_split_makes_patches_with_a_buffer_ring():
    coords = grid()
    val, pool = split_validation(
        len(coords), 0.2, True, np.random.default_rng(0), coords=coords, buffer=1.0, n_blocks=4
    )
    assert len(val) == 80
    assert set(val).isdisjoint(pool)
    # no training spot within one pitch of a validation spot (the buffer ring is left out)
    distance, _ = cKDTree(coords[pool]).query(coords[val])
    assert distance.min() > 100.0
    # contiguous patches: most validation spots have a validation neighbour one pitch away
    near = cKDTree(coords[val]).query(coords[val], k=2)[0][:, 1]
    assert np.mean(near <= 100.0 + 1e-6) > 0.9
    left_out = len(coords) - len(val) - len(pool)
    assert 0 < left_out < len(coords) * 0.4
    again = split_validation(
        len(coords), 0.2, True, np.random.default_rng(0), coords=coords, buffer=1.0, n_blocks=4
    )
    np.testing.assert_array_equal(again[0], val)


def test_blocked_split_without_buffer_keeps_every_spot():
    coords = grid(10)
    val, pool = split_validation(
        len(coords), 0.3, True, np.random.default_rng(1), coords=coords, buffer=0.0
    )
    assert len(val) + len(pool) == len(coords)


def test_split_errors():
    with pytest.raises(ValueError, match="validation_fraction > 0"):
        split_validation(100, 0.0, True, np.random.default_rng(0))
    with pytest.raises(InvalidStackError, match="at least 4"):
        split_validation(5, 0.4, True, np.random.default_rng(0))


# -- mini-batches --------------------------------------------------------------------------
def test_auto_batch_size_keeps_small_stacks_full_graph():
    from asign_sc.models._training import (
        AUTO_BATCH_SIZE,
        FULL_GRAPH_MAX_SPOTS,
        resolve_batch_size,
    )

    assert resolve_batch_size("auto", n_obs=910, n_pool=150) is None
    assert resolve_batch_size("auto", n_obs=FULL_GRAPH_MAX_SPOTS + 1, n_pool=9000) == (
        AUTO_BATCH_SIZE
    )
    # too large for memory: mini-batches whatever the size
    assert resolve_batch_size("auto", n_obs=910, n_pool=150, full_graph_fits=False) == 150
    # several processes: at least one batch each
    assert resolve_batch_size("auto", n_obs=910, n_pool=150, world_size=2) == 75
    assert resolve_batch_size(None, n_obs=10**6, n_pool=10**5) is None
    assert resolve_batch_size(64, n_obs=100, n_pool=50) == 64
    with pytest.raises(ValueError, match="devices=1"):
        resolve_batch_size(None, n_obs=100, n_pool=50, world_size=2)


def _split_plan(config, batch_size: int | None = None):
    """A toy plan of 150 spots, its known spots split 80/20 at random (seed 0).

    Returns the plan, the toy, the known rows and the pool and validation positions.
    """
    from .conftest import Toy, toy_plan

    toy = Toy(n=150)
    known = np.flatnonzero(toy.known.numpy())
    rng = np.random.default_rng(0)
    val_pos, pool_pos = split_validation(len(known), 0.2, True, rng)
    plan = toy_plan(toy, config, pool_pos=pool_pos, val_pos=val_pos, rng=rng, batch_size=batch_size)
    return plan, toy, known, pool_pos, val_pos


@pytest.fixture
def validation_subgraphs(monkeypatch):
    """Validation on the tiles' subgraphs, however much of the toy stack they cover."""
    from asign_sc.models import _training

    monkeypatch.setattr(_training, "WHOLE_STACK_VALIDATION_SHARE", math.inf)


def test_minibatch_plan_steps_once_per_tile_on_the_tiles_neighbourhood(
    one_thread, validation_subgraphs
):
    from asign_sc.models import TrainingConfig

    plan, _, known, pool_pos, _ = _split_plan(
        TrainingConfig(batch_size=32, num_neighbors=None),  # exact closures, built once
        batch_size=32,
    )
    n_tiles = len(plan.train_subgraphs)
    assert n_tiles == int(np.ceil(len(pool_pos) / 32)) or n_tiles == len(plan.train_tiles)
    seeds = np.concatenate([g.nodes[: g.n_seeds] for g in plan.train_subgraphs])
    np.testing.assert_array_equal(np.sort(seeds), np.sort(known[pool_pos]))
    # validation tiles never hold a training spot as a seed
    val_seeds = plan.val_rows.numpy()
    assert not set(val_seeds) & set(known[pool_pos])
    steps = []
    plan.optimizer.step = (lambda step: lambda *a, **k: (steps.append(1), step(*a, **k))[1])(
        plan.optimizer.step
    )
    history = plan.run(show_progress_bar=False)
    assert n_tiles >= 2 and len(history) == 3 and len(steps) == 3 * n_tiles
    assert np.isfinite(history[["loss", "val_loss", "val_pcc"]].to_numpy()).all()


def test_neighbour_sampled_plan_draws_new_training_subgraphs_every_step(
    one_thread, validation_subgraphs
):
    import torch

    from asign_sc.models import TrainingConfig

    from .conftest import toy_plan

    config = TrainingConfig(batch_size=32, num_neighbors=2, propagation_hops=1)
    plan, toy, _, pool_pos, val_pos = _split_plan(config, batch_size=32)
    assert not hasattr(plan, "train_subgraphs")
    drawn = []
    sampled = plan.sampler.sampled

    def recording(seeds, fanout, generator):
        drawn.append(sub := sampled(seeds, fanout, generator))
        return sub

    plan.sampler.sampled = recording
    val_edges = [sub.inputs.edge_index.clone() for sub in plan.val_subgraphs]
    history = plan.run(show_progress_bar=False)
    n_tiles = len(plan.train_tiles)
    assert n_tiles >= 2 and len(history) == 3 and len(drawn) == 3 * n_tiles
    assert np.isfinite(history[["loss", "val_loss", "val_pcc"]].to_numpy()).all()
    degree = np.diff(plan.sampler.attention.indptr)
    for sub in drawn:
        in_edges = np.bincount(sub.inputs.edge_index[1].numpy(), minlength=len(sub.nodes))
        # the propagation's hop (propagation_hops=1) is exact: the seeds keep every in-edge
        np.testing.assert_array_equal(in_edges[: sub.n_seeds], degree[sub.nodes[: sub.n_seeds]])
        # the fan-out bounds the in-edges of the message-passing hops beyond it
        assert in_edges[sub.n_seeds :].max() <= 2
        assert sub.n_seeds < sub.n_core < len(sub.nodes)
    # a tile's draws differ from epoch to epoch; validation keeps its subgraphs
    seeds = drawn[0].nodes[: drawn[0].n_seeds]
    first = [s for s in drawn if np.array_equal(s.nodes[: s.n_seeds], seeds)]
    assert len(first) == 3
    assert not all(np.array_equal(first[0].nodes, s.nodes) for s in first[1:])
    for before, sub in zip(val_edges, plan.val_subgraphs, strict=True):
        assert torch.equal(before, sub.inputs.edge_index)
    # sampling leaves the mask generator as it is: the same masks as exact training
    exact = toy_plan(
        toy,
        TrainingConfig(batch_size=32),
        pool_pos=pool_pos,
        val_pos=val_pos,
        rng=np.random.default_rng(5),
        batch_size=32,
    )
    again = toy_plan(
        toy, config, pool_pos=pool_pos, val_pos=val_pos, rng=np.random.default_rng(5), batch_size=32
    )
    assert exact.rng.bit_generator.state == again.rng.bit_generator.state


@pytest.mark.parametrize("num_neighbors", [None, 2])
def test_spread_validation_spots_are_scored_in_one_whole_stack_pass(
    one_thread, monkeypatch, num_neighbors
):
    from asign_sc.models import TrainingConfig, _training

    config = TrainingConfig(batch_size=32, num_neighbors=num_neighbors)
    plan, *_ = _split_plan(config, batch_size=32)
    # random validation spots: their tiles' closures hold more than half the stack
    assert plan.validate_whole_stack
    assert plan.val_subgraphs == [] and plan.closures["val"] == []
    whole = plan.validate()
    monkeypatch.setattr(_training, "WHOLE_STACK_VALIDATION_SHARE", math.inf)
    tiled_plan, *_ = _split_plan(config, batch_size=32)
    assert not tiled_plan.validate_whole_stack and tiled_plan.val_subgraphs
    tiled = tiled_plan.validate()
    if num_neighbors is None:  # exact closures: the same numbers as the whole-stack pass
        for key, value in whole.items():
            assert value == pytest.approx(tiled[key], rel=1e-5, abs=1e-6), key
    else:  # the whole-stack pass is exact, the sampled subgraphs are not
        assert np.isfinite(list(whole.values())).all()
    # its memory (a chunk of the network, whole-stack streams) is part of the estimate
    pass_bytes = _training.whole_stack_pass_bytes(
        plan.net, plan.inputs, _training.VALIDATION_CHUNK_SIZE
    )
    assert plan.memory_estimate().total >= pass_bytes.total
    history = plan.run(show_progress_bar=False)
    assert np.isfinite(history[["val_loss", "val_pcc"]].to_numpy()).all()


def test_feature_noise_perturbs_training_inputs_only(one_thread):
    import torch

    from asign_sc.models import TrainingConfig

    plan, toy, _, _, _ = _split_plan(TrainingConfig(batch_size=None, feature_noise=0.5))
    inputs = plan.inputs
    seen = []
    forward = plan.net.forward

    def recording(*args, **kwargs):
        seen.append((plan.net.training, args[:3]))
        return forward(*args, **kwargs)

    plan.net.forward = recording
    plan.model = plan.net
    plan.run(show_progress_bar=False)
    trained = [x for training, x in seen if training]
    validated = [x for training, x in seen if not training]
    assert len(trained) == 3 and len(validated) == 3
    clean = (toy.spot, toy.region, toy.glob)
    for features in validated:  # validation reads the features as they are
        for x, reference in zip(features, clean, strict=True):
            torch.testing.assert_close(x, reference)
    # every training step draws new noise of about 0.5 x each feature's spread
    for features in trained:
        for x, reference in zip(features, clean, strict=True):
            flat, ref = x.flatten(0, -2), reference.flatten(0, -2)
            ratio = float(((flat - ref).std(0) / ref.std(0)).mean())
            assert 0.4 < ratio < 0.6
    assert not torch.equal(trained[0][0], trained[1][0])
    # connectivity is never perturbed
    noisy = plan._training_args(inputs)
    assert all(a is b for a, b in zip(noisy[3:], inputs.args()[3:], strict=True))


def test_feature_noise_is_checked():
    from asign_sc.models import TrainingConfig

    for bad in (-0.1, float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="feature_noise must be a number >= 0"):
            TrainingConfig(feature_noise=bad)


def test_minibatch_consistency_covers_the_core_of_each_subgraph(one_thread):
    from asign_sc.models import TrainingConfig

    plan, _, _, _, _ = _split_plan(
        TrainingConfig(batch_size=32, num_neighbors=None, propagation_hops=1), batch_size=32
    )
    assert plan.sampler.n_hops == 1 + plan.net.message_passing_rounds
    seen = []
    loss = plan.loss

    def recording(pred, target, consistency_pred):
        seen.append((len(pred["spot"]), len(consistency_pred["spot"])))
        return loss(pred, target, consistency_pred=consistency_pred)

    plan.loss = recording
    plan.step()
    expected = sorted((g.n_seeds, g.n_core) for g in plan.train_subgraphs)
    assert sorted(seen) == expected
    # supervised on the tile's spots, consistency on them and their 1-hop neighbours
    assert all(n_seeds < n_core for n_seeds, n_core in seen)


def test_network_without_graph_attention_trains_on_exact_closures(one_thread):
    from asign_sc.models import TrainingConfig
    from asign_sc.models._sampling import khop_closure

    from .conftest import Toy, toy_plan

    toy = Toy(n=150)
    known = np.flatnonzero(toy.known.numpy())
    rng = np.random.default_rng(0)
    val_pos, pool_pos = split_validation(len(known), 0.2, True, rng)
    plan = toy_plan(
        toy,
        TrainingConfig(batch_size=32, num_neighbors=2, propagation_hops=2),
        pool_pos=pool_pos,
        val_pos=val_pos,
        rng=rng,
        batch_size=32,
        graph_attention=False,
    )
    # no message passing: nothing to sample, the closure is the 2 hops of the propagation
    assert plan.fanouts is None and plan.sampler.n_hops == 2
    for sub in plan.train_subgraphs:
        assert sub.n_core == len(sub.nodes)
        closure = khop_closure(plan.sampler.adjacency, sub.nodes[: sub.n_seeds], 2)
        np.testing.assert_array_equal(np.sort(sub.nodes), np.sort(closure))
    history = plan.run(show_progress_bar=False)
    assert np.isfinite(history[["loss", "val_loss"]].to_numpy()).all()
