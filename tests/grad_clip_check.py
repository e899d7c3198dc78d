"""A check shared by the tests of the PPO-family steps that clip their gradient (DNA, FixPO)."""

import pytest
import torch


def assert_step_clips_to(step, parameters: list[torch.Tensor], max_norm: float) -> None:
    """``step(loss)`` must return the gradient norm before clipping and leave each ``p.grad`` rescaled to
    ``max_norm``. The loss ``1e3 sum p^2`` has the gradient ``2e3 p``, known by hand, whose norm is well
    above ``max_norm``."""
    expected = [2e3 * p.detach().clone() for p in parameters]
    norm = torch.linalg.vector_norm(torch.cat([g.ravel() for g in expected]).double())
    returned = step(1e3 * sum((p ** 2).sum() for p in parameters))
    assert float(norm) > 20 * max_norm  # the clip binds
    assert float(returned) == pytest.approx(float(norm), rel=1e-5)
    for p, g in zip(parameters, expected):
        torch.testing.assert_close(p.grad, g * (max_norm / norm.float()), rtol=1e-4, atol=1e-8)
