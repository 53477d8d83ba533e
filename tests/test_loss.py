"""Swapped-prediction loss: hand computation, gradients, queue rows, heads, validation."""

from __future__ import annotations

import math

import pytest
import torch

from swav.loss import SwAVLoss
from swav.sinkhorn import sinkhorn


def _log_softmax_row(row: list[float], temperature: float) -> list[float]:
    z = [v / temperature for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def test_loss_equals_hand_computation_two_crops():
    # B=2 images, 2 crops, K=3 prototypes; crop-major rows: [crop0 img0, crop0 img1, crop1 ...]
    scores = torch.tensor(
        [[0.9, 0.1, -0.3], [-0.2, 0.8, 0.4], [0.7, 0.0, -0.1], [0.1, 0.6, 0.5]], dtype=torch.float64
    )
    t = 0.5
    loss_fn = SwAVLoss(n_crops=2, crops_for_assign=[0, 1], temperature=t, epsilon=0.3)
    out = loss_fn(scores, batch_size=2)
    q0 = sinkhorn(scores[:2], 0.3, 3).tolist()
    q1 = sinkhorn(scores[2:], 0.3, 3).tolist()
    rows = scores.tolist()

    def ce(q_rows, pred_rows):
        terms = [-sum(q * lp for q, lp in zip(qr, _log_softmax_row(pr, t)))
                 for qr, pr in zip(q_rows, pred_rows)]
        return sum(terms) / len(terms)

    expected = (ce(q0, rows[2:]) + ce(q1, rows[:2])) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert len(out.codes) == 2


def test_three_crops_average_over_the_other_crops():
    torch.manual_seed(0)
    b, k, t = 4, 5, 0.1
    scores = torch.randn(3 * b, k)
    out = SwAVLoss(n_crops=3, crops_for_assign=[0], temperature=t)(scores, b)
    q = sinkhorn(scores[:b], 0.05, 3)
    logp = torch.log_softmax(scores / t, dim=1)
    expected = (-(q * logp[b:2 * b]).sum(1).mean() - (q * logp[2 * b:]).sum(1).mean()) / 2
    torch.testing.assert_close(out.loss, expected)


def _per_crop_loss(scores, b, crops, t, queues=None):
    """The loss written per assigned crop: its own Sinkhorn call, the mean over the others."""
    n = scores.shape[0] // b
    logp = torch.log_softmax(scores / t, dim=1)
    total = 0.0
    for i, c in enumerate(crops):
        own = scores[c * b:(c + 1) * b]
        q = sinkhorn(own if queues is None else torch.cat([queues[i], own]), 0.05, 3)[-b:]
        total += sum(-(q * logp[o * b:(o + 1) * b]).sum(1).mean() for o in range(n) if o != c)
    return total / (n - 1) / len(crops)


@pytest.mark.parametrize("crops", [[0, 1], [2, 0], [1, 3]])
def test_assigned_crops_in_any_order_equal_the_loss_written_per_crop(crops):
    # The codes of all assigned crops come from one stacked Sinkhorn call: each crop's must
    # still be its own (and a non-contiguous or unordered crops_for_assign must pick the rows).
    torch.manual_seed(5)
    b, t = 6, 0.1
    scores = torch.nn.functional.normalize(torch.randn(4 * b, 7, dtype=torch.float64), dim=1)
    out = SwAVLoss(n_crops=4, crops_for_assign=crops, temperature=t)(scores, b)
    torch.testing.assert_close(out.loss, _per_crop_loss(scores, b, crops, t))
    for i, c in enumerate(crops):
        torch.testing.assert_close(out.codes[i], sinkhorn(scores[c * b:(c + 1) * b], 0.05, 3))


def test_float32_loss_of_a_full_size_batch_equals_the_float64_loss():
    # 6 crops x 256 images x 3000 prototypes: the cross-entropies sum 768,000 terms per pair of
    # crops; summed in one float32 accumulation they were 2e-4 off.
    torch.manual_seed(7)
    b, k = 256, 3000
    scores = torch.nn.functional.normalize(torch.randn(6 * b, k, dtype=torch.float64), dim=1) * 8
    loss_fn = SwAVLoss(n_crops=6)
    exact = loss_fn(scores, b).loss.item()
    assert loss_fn(scores.float(), b).loss.item() == pytest.approx(exact, rel=1e-6)


def test_each_assigned_crop_takes_its_own_queued_rows():
    torch.manual_seed(6)
    b, t = 4, 0.1
    scores = torch.randn(3 * b, 5, dtype=torch.float64)
    queues = [torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64) * 3]
    loss_fn = SwAVLoss(n_crops=3, crops_for_assign=[0, 1], temperature=t)
    out = loss_fn(scores, b, queue_scores=[queues])
    torch.testing.assert_close(out.loss, _per_crop_loss(scores, b, [0, 1], t, queues))
    with pytest.raises(ValueError, match="^queue_scores"):
        loss_fn(scores, b, queue_scores=[[queues[0], None]])


def test_no_gradient_flows_through_codes():
    """d loss / d scores of a predicting crop is (softmax(s/T) - q) / (T * B * (n_crops-1))
    and zero for the assigned crop's own rows when it is the only assigned crop."""
    torch.manual_seed(1)
    b, k, t = 6, 4, 0.2
    scores = torch.randn(2 * b, k, dtype=torch.float64, requires_grad=True)
    out = SwAVLoss(n_crops=2, crops_for_assign=[0], temperature=t)(scores, b)
    out.loss.backward()
    q = out.codes[0].double()
    assert not q.requires_grad
    expected = (torch.softmax(scores[b:].detach() / t, dim=1) - q) / (t * b)
    torch.testing.assert_close(scores.grad[b:], expected)
    assert torch.count_nonzero(scores.grad[:b]) == 0


def test_queue_rows_enter_the_codes_but_only_batch_rows_are_targets():
    torch.manual_seed(2)
    b, k = 4, 6
    scores = torch.randn(2 * b, k)
    queued = torch.randn(12, k)
    loss_fn = SwAVLoss(n_crops=2, crops_for_assign=[0])
    with_queue = loss_fn(scores, b, queue_scores=[[queued]])
    without = loss_fn(scores, b)
    expected_codes = sinkhorn(torch.cat([queued, scores[:b]]), 0.05, 3)[-b:]
    torch.testing.assert_close(with_queue.codes[0], expected_codes)
    assert with_queue.codes[0].shape == (b, k)
    assert not torch.allclose(with_queue.loss, without.loss)


def test_several_heads_average_their_losses():
    torch.manual_seed(3)
    b = 4
    heads = [torch.randn(2 * b, 5), torch.randn(2 * b, 9)]
    loss_fn = SwAVLoss(n_crops=2)
    out = loss_fn(heads, b)
    separate = [loss_fn(h, b).loss for h in heads]
    torch.testing.assert_close(out.loss, (separate[0] + separate[1]) / 2)
    assert out.codes[0].shape == (b, 5)


def test_bf16_scores_give_a_float32_loss():
    torch.manual_seed(4)
    scores = torch.nn.functional.normalize(torch.randn(16, 10), dim=1)
    loss_fn = SwAVLoss(n_crops=2, epsilon=0.01)
    low = loss_fn(scores.bfloat16(), 8).loss
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert low.item() == pytest.approx(loss_fn(scores.bfloat16().float(), 8).loss.item(), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"n_crops": 1}, "nmb_crops"),
        ({"n_crops": 2, "crops_for_assign": [0, 2]}, "crops_for_assign"),
        ({"n_crops": 2, "crops_for_assign": [-1]}, "crops_for_assign"),
        ({"n_crops": 2, "crops_for_assign": []}, "crops_for_assign"),
        ({"n_crops": 2, "crops_for_assign": [0, 0]}, "crops_for_assign"),
        ({"n_crops": 2, "temperature": 0}, "temperature"),
        ({"n_crops": 2, "epsilon": 0}, "epsilon"),
        ({"n_crops": 2, "epsilon": -1}, "epsilon"),
        ({"n_crops": 2, "sinkhorn_iterations": 0}, "sinkhorn_iterations"),
    ],
)
def test_bad_configuration_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SwAVLoss(**kwargs)


def test_scores_of_the_wrong_size_are_rejected():
    with pytest.raises(ValueError, match="^scores"):
        SwAVLoss(n_crops=3)(torch.randn(10, 4), batch_size=4)
