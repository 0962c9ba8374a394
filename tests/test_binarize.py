import pytest
import torch

from had_hf.binarize import sign, transform


def test_sign_maps_zero_to_plus_one():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0])
    assert sign(x).tolist() == [-1.0, 1.0, 1.0, 1.0, 1.0]


def test_stage_formulas():
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    sigma, c = 1.7, 0.4
    torch.testing.assert_close(transform(x, sigma, "tanh", c), sigma * c * torch.tanh(x / (c * sigma)))
    torch.testing.assert_close(transform(x, sigma, "sign", c), sigma * torch.tanh(x / (c * sigma)))
    torch.testing.assert_close(transform(x, sigma, "binary"), sigma * torch.where(x >= 0, 1.0, -1.0).double())
    # stage 1 at c = 1 equals stage 2 at c = 1 (the hand-over point)
    torch.testing.assert_close(transform(x, sigma, "tanh", 1.0), transform(x, sigma, "sign", 1.0))
    # stage 1 tends to the identity for large c, stage 2 to sigma*sign for small c
    torch.testing.assert_close(transform(x, sigma, "tanh", 1e4), x, atol=1e-6, rtol=0)
    nonzero = x[x != 0]
    torch.testing.assert_close(transform(nonzero, sigma, "sign", 1e-4), sigma * sign(nonzero))


@pytest.mark.parametrize("stage", ["tanh", "sign"])
def test_tanh_stages_pass_gradcheck(stage):
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: transform(t, 0.8, stage, 0.6), (x,))


def test_ste_forward_is_sign_and_gradient_is_clipped_identity():
    sigma, clip = 2.0, 1.0
    x = torch.tensor([-5.0, -2.0, -1.9, 0.0, 1.0, 2.0, 2.1, 7.0], requires_grad=True)
    y = transform(x, sigma, "ste", ste_clip=clip)
    assert y.tolist() == (sigma * sign(x.detach())).tolist()
    upstream = torch.arange(1.0, 9.0)
    y.backward(upstream)
    expected = upstream * ((x.detach() / sigma).abs() <= clip).float()
    assert x.grad.tolist() == expected.tolist()
    assert x.grad[0] == 0 and x.grad[1] == 2.0  # |x/sigma| = 2.5 outside, = 1.0 on the bound

    x2 = x.detach().clone().requires_grad_(True)
    transform(x2, sigma, "ste", ste_clip=2.0).sum().backward()
    assert x2.grad.tolist() == ((x2.detach() / sigma).abs() <= 2.0).float().tolist()


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="Unknown HAD stage"):
        transform(torch.zeros(2), 1.0, "ternary")
