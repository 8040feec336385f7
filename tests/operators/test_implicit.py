"""implicit_root: the implicit function theorem's gradient, against the closed form
and finite differences, and unknowns that do not enter their problem."""

import torch

from fenop.operators.implicit import implicit_root


def _cube_root(w, a):
    return w**3 - a  # root a^(1/3), blockwise


def test_the_gradient_is_the_closed_forms_and_passes_gradcheck():
    a = torch.tensor([[[8.0, 27.0], [1.0, 64.0]]], dtype=torch.float64, requires_grad=True)
    w = implicit_root(_cube_root, a.detach() ** (1 / 3), a)
    (grad,) = torch.autograd.grad(w.sum(), a)
    torch.testing.assert_close(grad, a.detach() ** (-2 / 3) / 3)
    assert torch.autograd.gradcheck(
        lambda a: implicit_root(_cube_root, a.detach() ** (1 / 3), a), (a,)
    )


def test_an_unknown_whose_row_and_column_vanish_gets_no_gradient_and_breaks_nothing():
    # block 0: w0³ = a0 and an unknown w1 that no equation sees (a basis field that is
    # zero on an expert's patch, held at zero by the forward solve); block 1 all zero
    # (a padding expert)
    def f(w, a):
        mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
        return mask * (w**3 - a)

    a = torch.tensor([[[8.0, 5.0], [3.0, 2.0]]], dtype=torch.float64, requires_grad=True)
    solution = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    (grad,) = torch.autograd.grad(implicit_root(f, solution, a).sum(), a)
    torch.testing.assert_close(grad, torch.tensor([[[1 / 12, 0.0], [0.0, 0.0]]]).double())
