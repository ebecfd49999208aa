from __future__ import annotations

import torch

from asign_sc._utils import by_row_chunks, row_slices


def test_row_slices_cover_the_rows_once_in_order():
    slices = list(row_slices(10, 4))
    assert slices == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert list(row_slices(0, 4)) == []


def test_by_row_chunks_equals_concatenated_chunks_for_tensors_and_dicts():
    x = torch.randn(23, 3, 2)
    calls = []

    def tensor(rows: slice) -> torch.Tensor:
        calls.append(rows)
        return x[rows].sum(-1) * 2

    out = by_row_chunks(tensor, 23, 5)
    assert torch.equal(out, x.sum(-1) * 2) and len(calls) == 5
    parts = by_row_chunks(lambda rows: {"a": x[rows], "b": x[rows, 0, :1]}, 23, 7)
    assert set(parts) == {"a", "b"}
    assert torch.equal(parts["a"], x) and torch.equal(parts["b"], x[:, 0, :1])
    assert parts["b"].shape == (23, 1)
