"""Independent references for the curvature tests: dense Hessians by ``torch.func``."""

import torch
from torch.func import functional_call, hessian
from torch.nn.attention import SDPBackend, sdpa_kernel


def reference_hessian(model, loss_fn, batch, names=None, method="func"):
    """Dense Hessian and gradient over the flat selected parameters, by ``torch.func``.

    ``method="func"``: ``torch.func.hessian`` (forward-over-reverse). ``method="fd"``: central
    differences of ``torch.func.grad``, for LayerNorm, where torch.func's vmapped second
    derivative is wrong in some torch versions (asymmetric, off by O(0.1); plain autograd
    double backward agrees with finite differences).
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params) if names is None else names
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].reshape(-1) for n in names])

    def f(flat):
        chunks = flat.split([s.numel() for s in shapes])
        full = dict(params)
        full.update({n: c.view(s) for n, c, s in zip(names, chunks, shapes)})
        return loss_fn(lambda *a: functional_call(model, full, a), batch)

    with sdpa_kernel([SDPBackend.MATH]):
        grad = torch.func.grad(f)
        if method == "func":
            return hessian(f)(flat0), grad(flat0)
        h = 1e-5
        eye = torch.eye(flat0.numel(), dtype=flat0.dtype)
        cols = [(grad(flat0 + h * e) - grad(flat0 - h * e)) / (2 * h) for e in eye]
        return torch.stack(cols, dim=1), grad(flat0)
