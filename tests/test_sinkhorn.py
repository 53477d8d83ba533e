"""Sinkhorn-Knopp codes against the paper's algorithm, its marginals, stability and distribution."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from swav.sinkhorn import sinkhorn


def paper_sinkhorn(
    scores: torch.Tensor, epsilon: float, iterations: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Algorithm of Caron et al. (2020), Appendix A.1, literally (single process)."""
    q = torch.exp(scores.to(dtype) / epsilon).t()  # K x B
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


@pytest.mark.parametrize("epsilon,iterations", [(0.05, 3), (0.1, 1), (0.03, 10)])
def test_matches_paper_algorithm_in_float64(epsilon, iterations):
    torch.manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(96, 24, dtype=torch.float64), dim=1)
    expected = paper_sinkhorn(scores, epsilon, iterations)
    codes = sinkhorn(scores, epsilon, iterations)
    assert codes.dtype == torch.float64
    torch.testing.assert_close(codes, expected, rtol=1e-10, atol=1e-12)


def test_float32_matches_float64_reference():
    torch.manual_seed(1)
    scores = torch.rand(64, 16) * 2 - 1
    codes = sinkhorn(scores, 0.05, 3)
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes.double(), paper_sinkhorn(scores, 0.05, 3), atol=1e-5, rtol=1e-4)


def test_rows_sum_to_one_and_prototype_marginals_converge_to_b_over_k():
    torch.manual_seed(2)
    b, k = 120, 12
    scores = torch.rand(b, k) * 2 - 1
    few = sinkhorn(scores, 0.05, 3)
    many = sinkhorn(scores, 0.05, 300)
    for codes in (few, many):
        torch.testing.assert_close(codes.sum(dim=1), torch.ones(b))
    target = torch.full((k,), b / k)
    torch.testing.assert_close(many.sum(dim=0), target, atol=1e-3, rtol=0)
    # Three iterations are already close, and more iterations are closer.
    assert (few.sum(0) - target).abs().max() < 0.5 * b / k
    assert (many.sum(0) - target).abs().max() < (few.sum(0) - target).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stable_at_epsilon_001_with_half_precision_scores(dtype):
    torch.manual_seed(3)
    scores = torch.nn.functional.normalize(torch.randn(256, 100), dim=1).to(dtype)
    codes = sinkhorn(scores, epsilon=0.01, iterations=3)
    assert codes.dtype == torch.float32
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(256))
    # The low-precision input is only rounded, not computed in: same codes as its float64 copy.
    expected = paper_sinkhorn(scores.double(), 0.01, 3).float()
    torch.testing.assert_close(codes, expected, atol=1e-4, rtol=1e-3)


def test_stable_where_the_exp_domain_algorithm_breaks():
    """At epsilon=0.01 exp(S/eps) overflows float32 for scores near 1 and underflows for a
    prototype that every sample scores near -1: the literal algorithm gives inf/NaN there.
    The log-domain codes stay finite and still give that prototype its share of the batch."""
    b, k = 32, 4
    scores = torch.full((b, k), -1.0)
    scores[:, :3] = torch.rand(b, 3) * 0.2 + 0.8
    scores[0, 3] = -0.9  # sample 0 is the best candidate for prototype 3
    literal = paper_sinkhorn(scores, 0.01, 3, dtype=torch.float32)
    assert not torch.isfinite(literal).all()
    codes = sinkhorn(scores, epsilon=0.01, iterations=50)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=0), torch.full((k,), b / k), atol=1e-3, rtol=0)
    assert codes[0, 3] > 0.99


def test_no_gradient_flows_through_codes():
    scores = torch.randn(8, 4, requires_grad=True)
    codes = sinkhorn(scores)
    assert not codes.requires_grad


@pytest.mark.parametrize(
    "kwargs,field",
    [({"epsilon": 0.0}, "epsilon"), ({"epsilon": -0.1}, "epsilon"), ({"iterations": 0}, "iterations")],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        sinkhorn(torch.randn(4, 3), **kwargs)


def test_rejects_non_matrix_scores():
    with pytest.raises(ValueError, match="^scores"):
        sinkhorn(torch.randn(4))


def test_a_stack_of_matrices_gets_each_matrix_s_own_codes():
    torch.manual_seed(5)
    stack = torch.nn.functional.normalize(torch.randn(3, 40, 12, dtype=torch.float64), dim=-1)
    stack[1] *= 0.5  # the matrices differ in scale: one set of marginals would not fit all three
    codes = sinkhorn(stack, 0.05, 3)
    assert codes.shape == stack.shape
    for i in range(3):
        torch.testing.assert_close(codes[i], paper_sinkhorn(stack[i], 0.05, 3),
                                   rtol=1e-10, atol=1e-12)


# -- distributed: 2 gloo processes on CPU -----------------------------------------------------

def _worker(rank: int, world: int, init_file: str, scores: torch.Tensor, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = scores.chunk(world)[rank]
        torch.save(sinkhorn(shard, 0.05, 3, gather=True), os.path.join(out_dir, f"gathered{rank}.pt"))
        torch.save(sinkhorn(shard, 0.05, 3, gather=False), os.path.join(out_dir, f"local{rank}.pt"))
        stack = torch.stack([scores, scores.flip(0) * 0.5]).chunk(world, dim=1)[rank]
        torch.save(sinkhorn(stack, 0.05, 3, gather=True), os.path.join(out_dir, f"stack{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_workers_equal_one_process_on_the_concatenated_batch():
    torch.manual_seed(4)
    scores = torch.nn.functional.normalize(torch.randn(2 * 48, 30), dim=1)
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, scores, tmp), nprocs=2, join=True)
        gathered = torch.cat([torch.load(os.path.join(tmp, f"gathered{r}.pt")) for r in range(2)])
        local = torch.cat([torch.load(os.path.join(tmp, f"local{r}.pt")) for r in range(2)])
        stack = torch.cat([torch.load(os.path.join(tmp, f"stack{r}.pt")) for r in range(2)], dim=1)
    single = sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(gathered, single, atol=1e-6, rtol=1e-5)
    # A stack of two matrices (the assigned crops), each gathered over the workers on its own.
    torch.testing.assert_close(stack[0], single, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stack[1], sinkhorn(scores.flip(0) * 0.5, 0.05, 3),
                               atol=1e-6, rtol=1e-5)
    # Without gathering each worker equipartitions its own half: a different answer.
    assert (local - single).abs().max() > 1e-3
