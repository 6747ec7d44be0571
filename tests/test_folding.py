"""BatchNorm folding (core.models.folding): the folded view is the same function as the model, follows
weight updates, falls back to the model whenever folding does not apply, and attacks through it
give the same results."""

from __future__ import annotations

import torch
import torch.nn as nn

from core.attacks import AttackSpec, eval_mode, run_attack
from core.models import build_model
from core.models import folding
from core.models.folding import fold_count, folded


def _with_bn_statistics(arch: str, seed: int = 0) -> nn.Module:
    """A model whose BatchNorms hold non-trivial statistics and affine parameters."""
    torch.manual_seed(seed)
    m = build_model(arch, 10)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.rand(32, 3, 32, 32) * 0.8 + 0.1)
    return m.eval()


def _input_grad(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xr = x.clone().requires_grad_(True)
    logits = net(xr)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y), xr)
    return logits.detach(), g


def test_folded_view_is_the_same_function_with_the_same_input_gradient():
    x, y = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10
    for arch, pairs in (("smallcnn", 3), ("resnet18", 20)):
        m = _with_bn_statistics(arch)
        with eval_mode(m):
            view = folded(m, x)
            assert view is not m and fold_count(m) == pairs
            assert not any(isinstance(mod, nn.BatchNorm2d) for mod in view.modules()
                           if mod not in set(m.modules())) and not any(p.requires_grad for p in view.parameters())
            lv, gv = _input_grad(view, x, y)
            lm, gm = _input_grad(m, x, y)
        scale = lm.abs().max()
        assert (lv - lm).abs().max() <= 1e-5 * scale, arch
        # input gradients agree up to rounding, relative to their size (a random-init ResNet's are ~1e-4)
        assert (gv - gm).norm() <= 1e-3 * gm.norm(), arch
        # the original model still has its BatchNorms and its parameters back
        assert sum(isinstance(mod, nn.BatchNorm2d) for mod in m.modules()) >= pairs
        assert all(p.requires_grad for p in m.parameters())


def test_view_follows_weight_updates_and_device_or_dtype_changes():
    m = _with_bn_statistics("smallcnn")
    x, y = torch.rand(16, 3, 32, 32), torch.arange(16) % 10
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for _ in range(2):  # a training step changes weights and BatchNorm statistics in place
        m.train()
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        with eval_mode(m), torch.no_grad():
            view = folded(m, x)
            assert view is not m
            torch.testing.assert_close(view(x), m(x), rtol=1e-5, atol=1e-5)
    m.double()
    with eval_mode(m), torch.no_grad():
        view = folded(m)
        out = view(x.double())
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, m(x.double()), rtol=1e-10, atol=1e-10)


class _DataDependent(nn.Module):
    """torch.fx cannot trace a branch on the input's values."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 10)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if h.mean() > 0:
            h = h * 2
        return self.fc(h.mean((2, 3)))


class _NoBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_falls_back_to_the_model_itself_whenever_folding_does_not_apply(monkeypatch):
    x = torch.rand(4, 3, 32, 32)
    for m in (_DataDependent().eval(), _NoBatchNorm().eval()):
        with eval_mode(m):
            assert folded(m, x) is m
    m = _with_bn_statistics("smallcnn", seed=1)
    assert folded(m, x) is m                 # parameters require gradients: someone trains through this call
    m.train()
    for p in m.parameters():
        p.requires_grad_(False)
    assert folded(m, x) is m                 # BatchNorm in training mode uses batch statistics
    m.eval()
    assert folded(m, x) is not m             # the same model, eval mode and frozen: folded
    monkeypatch.setattr(folding, "REL_TOL", -1.0)  # any disagreement with the model's outputs: not used
    fresh = _with_bn_statistics("smallcnn", seed=2)
    with eval_mode(fresh):
        assert folded(fresh, x) is fresh


def test_attacks_through_the_folded_view_match_the_module_as_it_is():
    m = _with_bn_statistics("smallcnn", seed=3)
    x, y = torch.rand(32, 3, 32, 32), torch.arange(32) % 10
    spec = AttackSpec("pgd", eps=8 / 255, steps=5, seed=0)
    a = run_attack(m, x, y, spec)
    b = run_attack(m, x, y, spec, fold_bn=False)
    assert (a.x_adv - x).abs().max() <= 8 / 255 + 1e-6 and a.x_adv.min() >= 0 and a.x_adv.max() <= 1
    # natural energies agree to rounding; sign steps can differ where a gradient entry is ~0, so the
    # end points agree closely on average, and both attacks are equally strong
    assert abs(a.trace.marginal[0] - b.trace.marginal[0]).max() < 1e-4
    assert abs(a.trace.marginal[-1] - b.trace.marginal[-1]).mean() < 1e-2
    assert abs(a.trace.robust_accuracy() - b.trace.robust_accuracy()) <= 2 / 32



def test_a_view_that_cannot_run_the_example_is_not_used(monkeypatch):
    m = _with_bn_statistics("smallcnn", seed=4)
    x = torch.rand(4, 3, 32, 32)

    def broken_build(model):
        entry = real_build(model)

        class Broken(nn.Module):
            def forward(self, inp):
                raise RuntimeError("traced graph cannot run this input")
        entry.module = Broken()
        return entry

    real_build = folding.build_folded
    monkeypatch.setattr(folding, "build_folded", broken_build)
    with eval_mode(m):
        assert folded(m, x) is m


def test_conv_without_bias_and_batchnorm_without_affine_fold_to_the_same_function():
    """The optional tensors of the fold (conv bias, BatchNorm gamma / beta) may each be absent."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                      nn.Conv2d(4, 5, 3, bias=True), nn.BatchNorm2d(5), nn.Flatten())
    with torch.no_grad():
        m[4].weight.uniform_(0.5, 1.5)
        m[4].bias.uniform_(-0.3, 0.3)
    m.train()
    with torch.no_grad():
        m(torch.rand(16, 3, 8, 8))
    m.eval()
    x = torch.rand(4, 3, 8, 8)
    with eval_mode(m):
        view = folded(m, x)
        assert view is not m and fold_count(m) == 2
        with torch.no_grad():
            ref, out = m(x), view(x)
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
