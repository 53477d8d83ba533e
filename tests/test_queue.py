"""Feature queue: FIFO order, fullness, per-worker length, state round trip, validation."""

from __future__ import annotations

import pytest
import torch

from swav.queue import FeatureQueue, per_worker_length


def _batch(value: float, rows: int = 2, dim: int = 3) -> list[torch.Tensor]:
    return [torch.full((rows, dim), value), torch.full((rows, dim), -value)]


def test_push_puts_the_newest_batch_first_and_drops_the_oldest():
    q = FeatureQueue(n_views=2, length=6, dim=3)
    for value in (1.0, 2.0, 3.0):
        assert not q.full
        q.push(_batch(value))
    assert q.full
    assert q.embeddings(0)[:, 0].tolist() == [3, 3, 2, 2, 1, 1]
    assert q.embeddings(1)[:, 0].tolist() == [-3, -3, -2, -2, -1, -1]
    q.push(_batch(4.0))
    assert q.embeddings(0)[:, 0].tolist() == [4, 4, 3, 3, 2, 2]


def test_pushed_embeddings_are_detached_copies():
    q = FeatureQueue(1, 4, 2)
    x = torch.ones(2, 2, requires_grad=True)
    q.push([x * 2])
    assert not q.buffer.requires_grad
    assert q.embeddings(0)[0].tolist() == [2.0, 2.0]


def test_zero_length_queue_is_never_full():
    q = FeatureQueue(1, 0, 2)
    q.push([torch.ones(2, 2)])
    assert not q.full


@pytest.mark.parametrize(
    "length,batch,world,expected", [(3840, 64, 1, 3840), (3840, 64, 4, 960), (100, 32, 2, 32), (10, 32, 1, 0)]
)
def test_per_worker_length_rounds_to_whole_global_batches(length, batch, world, expected):
    assert per_worker_length(length, batch, world) == expected


def test_state_dict_round_trip():
    q = FeatureQueue(2, 4, 3)
    q.push(_batch(5.0))
    r = FeatureQueue(2, 4, 3)
    r.load_state_dict(q.state_dict())
    assert torch.equal(r.buffer, q.buffer) and r.filled == 2 and not r.full


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="^queue_length"):
        FeatureQueue(1, -1, 3)
    with pytest.raises(ValueError, match="^queue_length"):
        per_worker_length(-5, 8, 1)
    with pytest.raises(ValueError, match="^embeddings"):
        FeatureQueue(2, 4, 3).push([torch.ones(2, 3)])
