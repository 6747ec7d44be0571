"""Attack fast paths of issue 25: the natural forward of a trace batched with the final one, trace rows in step
order, and the folded view's own channels-last copies of every convolution (the model's weights untouched)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from core.attacks import AttackSpec, run_attack
from core.drift import TraceRecorder, natural_trace
from core.models import build_model
from core.models.folding import build_folded, folded


def _model(arch="smallcnn"):
    torch.manual_seed(0)
    return build_model(arch, 10).eval()


def _data(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_trace_starts_at_the_natural_point_and_runs_in_step_order():
    model, (x, y) = _model(), _data()
    spec = AttackSpec("pgd", eps=8 / 255, step_size=2 / 255, steps=4, seed=0)
    tr = run_attack(model, x, y, spec).trace
    nat = natural_trace(model, x, y)
    assert tr.steps.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(tr.marginal[0], nat.marginal[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tr.joint[0], nat.joint[0], rtol=1e-4, atol=1e-4)
    assert (tr.pred[0] == nat.pred[0]).all()
    # the final row is the returned images' energies
    fin = natural_trace(model, run_attack(model, x, y, spec).x_adv, y)
    np.testing.assert_allclose(tr.marginal[-1], fin.marginal[0], rtol=1e-4, atol=1e-4)


def test_the_trace_does_not_change_the_attack():
    model, (x, y) = _model(), _data()
    spec = AttackSpec("pgd", eps=8 / 255, step_size=2 / 255, steps=3, seed=0)
    assert torch.equal(run_attack(model, x, y, spec).x_adv, run_attack(model, x, y, spec, record_trace=False).x_adv)


def test_an_interrupted_attack_keeps_its_natural_step():
    model, (x, y) = _model(), _data()
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3  # before the 3rd step

    res = run_attack(model, x, y, AttackSpec("pgd", eps=8 / 255, step_size=2 / 255, steps=6, seed=0),
                     should_stop=stop)
    assert res.partial
    assert res.trace.steps.tolist() == [0, 1, 2]
    np.testing.assert_allclose(res.trace.marginal[0], natural_trace(model, x, y).marginal[0], rtol=1e-4, atol=1e-4)


def test_recorder_sorts_rows_recorded_out_of_order():
    y = torch.tensor([0, 1])
    rec = TraceRecorder(y)
    logits = {s: torch.randn(2, 3) for s in range(3)}
    for s in (1, 2, 0):
        rec.record(s, logits[s])
    tr = rec.finish()
    assert tr.steps.tolist() == [0, 1, 2]
    for s in range(3):
        np.testing.assert_allclose(tr.joint[s], -logits[s].gather(1, y[:, None]).squeeze(1).numpy())


class _PlainConvNet(nn.Module):
    """conv -> BN (folded) and a conv not followed by BN (a copy in the view)."""

    cpu_input_layout = torch.channels_last

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.c2(torch.relu(self.bn(self.c1(x)))).mean((2, 3)))


def test_view_copies_every_conv_channels_last_and_follows_the_originals():
    torch.manual_seed(0)
    model = _PlainConvNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(4, 3, 16, 16)
    view = folded(model, x)
    assert view is not model
    convs = [m for m in view.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert all(c.weight.is_contiguous() for c in (model.c1, model.c2))  # the model's own weights untouched
    torch.testing.assert_close(view(x), model(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an in-place update of the plain conv reaches the view
        model.c2.weight.mul_(-2.0)
    torch.testing.assert_close(folded(model, x)(x), model(x), rtol=1e-5, atol=1e-5)


def test_models_without_a_cpu_layout_keep_their_plain_convs_shared():
    class Net(_PlainConvNet):
        cpu_input_layout = None

    torch.manual_seed(0)
    entry = build_folded(Net().eval())
    assert entry is not None and entry.n_folded == 1 and len(entry.pairs) == 1
