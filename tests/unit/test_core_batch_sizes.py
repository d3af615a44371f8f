"""`measure_batch_size`, which counts the samples of a batch for the sample clock: tuples, dicts, lists of
per-sample values, lightly's views, numpy arrays, lists of records and of per-view dicts give the size they all
agree on (0-d tensors have no batch dimension), and a batch whose parts disagree or that has nothing to measure
raises an error that names the parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_emascale._batch import measure_batch_size


@pytest.mark.parametrize(
    ("batch", "size"),
    [
        ((torch.zeros(4, 6), torch.zeros(4)), 4),
        ({"x": [torch.zeros(4)] * 6, "y": torch.zeros(4)}, 4),  # default_collate of a list-valued feature
        ({"ids": [[1, 2, 3]] * 5, "x": torch.zeros(5, 3)}, 5),  # a list of per-sample lists
        ([[torch.zeros(2, 3), torch.zeros(2, 3)], torch.zeros(2), ["a.png", "b.png"]], 2),  # lightly's views
        ({"scale": torch.tensor(0.5), "x": torch.zeros(3, 1)}, 3),  # a 0-d tensor has no batch dimension
    ],
)
def test_measure_batch_size_agrees_across_the_batch(batch, size):
    assert measure_batch_size(batch) == size


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({"meta": torch.tensor([7]), "x": torch.zeros(4, 3)}, r"ambiguous.*\['meta'\]: 1, \['x'\]: 4"),
        ({"x": torch.zeros(4, 3), "ids": [1, 2, 3]}, r"ambiguous.*\['ids'\]: 3"),
        ({"a": "text", "b": 3}, r"Cannot measure the batch size of a dict"),
    ],
)
def test_an_ambiguous_or_unmeasurable_batch_raises(batch, match):
    with pytest.raises(ValueError, match=match):
        measure_batch_size(batch)


@pytest.mark.parametrize(
    ("batch", "size"),
    [
        ((np.zeros((4, 3)), np.zeros(4)), 4),  # numpy arrays have a batch dimension, like tensors
        ([{"image": torch.zeros(3, 8, 8), "boxes": torch.zeros(2, 4)}] * 5, 5),  # detection: a list of records
    ],
)
def test_numpy_batches_and_lists_of_records(batch, size):
    assert measure_batch_size(batch) == size


def test_lists_of_per_view_dicts_share_their_batch_dimension():
    # two dataloaders (or views) whose batches are dicts of 8: 8 samples, not 2 "records"
    assert measure_batch_size([{"x": torch.zeros(8, 3)}, {"x": torch.zeros(8, 3)}]) == 8
