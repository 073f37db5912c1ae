"""casa.Muon, the optimizer train.py uses for weight matrices, against independent references: its
orthogonalisation against the SVD, its steps against torch.optim.Muon (which computes the same update
in bfloat16)."""

import torch

import casa


def test_orthogonalize_keeps_the_singular_vectors_and_flattens_the_singular_values():
    g = torch.Generator().manual_seed(0)
    for shape in [(32, 96), (96, 32), (48, 48)]:
        # a gradient-like matrix: singular values spread over two orders of magnitude
        U, _, Vh = torch.linalg.svd(torch.randn(*shape, generator=g, dtype=torch.float64), full_matrices=False)
        s = torch.logspace(0, -2, min(shape), dtype=torch.float64)
        G = (U * s) @ Vh
        O = casa.orthogonalize(G).double()
        assert O.shape == G.shape
        inner = U.T @ O @ Vh.T  # O in G's singular bases: diagonal, each entry near 1
        off = inner - torch.diag(torch.diagonal(inner))
        assert off.abs().max() < 1e-4, shape
        d = torch.diagonal(inner)
        assert d.min() > 0.6 and d.max() < 1.25, (shape, d.min(), d.max())  # not 0.01 .. 1 as in G
        # a plain gradient step moves the largest direction 100x the smallest; this one about alike
        assert d.max() / d.min() < 2


def test_muon_steps_match_torch_optim_muon():
    """Three steps from the same weights and gradients: casa.Muon (float32) against torch.optim.Muon
    with the same scaling (match_rms_adamw), no weight decay, Nesterov momentum 0.95. torch's
    orthogonalisation runs in bfloat16, hence the tolerance (updates agree to about 1%)."""
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(64, 16, generator=g), torch.randn(16, 48, generator=g)]
    ours = [w.clone().requires_grad_() for w in weights]
    ref = [w.clone().requires_grad_() for w in weights]
    opt_ours = casa.Muon(ours, lr=0.01)
    opt_ref = torch.optim.Muon(ref, lr=0.01, weight_decay=0.0, momentum=0.95, nesterov=True,
                               adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grads = [torch.randn(w.shape, generator=g) for w in weights]
        for params, opt in [(ours, opt_ours), (ref, opt_ref)]:
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            opt.step()
    for w, a, b in zip(weights, ours, ref):
        moved_ours, moved_ref = a.detach() - w, b.detach() - w
        assert moved_ours.norm() > 0.05  # the steps are not nothing
        assert (moved_ours - moved_ref).norm() < 0.02 * moved_ref.norm()


def test_muon_state_round_trips_through_a_state_dict():
    """train.py's resume saves and loads it (tests/test_train.py: resume is exact)."""
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = casa.Muon([w], lr=0.1)
    w.grad = torch.ones(8, 4)
    opt.step()
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = casa.Muon([w2], lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    for p, o in [(w, opt), (w2, opt2)]:
        p.grad = torch.full((8, 4), -0.5)
        o.step()
    assert torch.equal(w, w2)
