import math

import pytest
import torch
from omegaconf import OmegaConf

from da_runner.nn.grl import grad_reverse
from da_runner.schedules import grl_lambda, lr_factor
from conftest import make_cfg


@pytest.mark.parametrize("lam", [0.0, 0.37, 1.0, 2.5])
def test_grl_is_identity_forward_and_reverses_gradient(lam):
    torch.manual_seed(0)
    x = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)
    y = grad_reverse(x, lam)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.equal(x.grad, -lam * upstream)


def test_grl_only_reverses_the_branch_behind_it():
    x = torch.ones(3, requires_grad=True)
    (x.sum() + grad_reverse(x, 0.5).sum() * 2).backward()
    # 1 from the plain branch, -0.5 * 2 from the reversed one
    assert torch.allclose(x.grad, torch.zeros(3))


def grl(name, **kw):
    return OmegaConf.create({"name": name, **kw})


def test_constant_schedule():
    for step in (0, 50, 100):
        assert grl_lambda(step, 100, grl("constant", hi=0.3)) == 0.3


def test_ganin_schedule_values():
    # A function of progress p = step / max_steps: the same p gives the same value for any run length.
    cfg = grl("ganin", hi=1.0, gamma=10.0)
    assert grl_lambda(0, 100, cfg) == 0.0
    assert grl_lambda(50, 100, cfg) == pytest.approx(2 / (1 + math.exp(-5)) - 1)  # 0.98661
    assert grl_lambda(500, 1000, cfg) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert grl_lambda(100, 100, cfg) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert grl_lambda(5, 10, grl("ganin", hi=0.3, gamma=5.0)) == pytest.approx(0.3 * (2 / (1 + math.exp(-2.5)) - 1))


def test_linear_schedule_ramps_then_holds():
    cfg = grl("linear", hi=2.0, ramp_fraction=0.5)
    assert [grl_lambda(s, 100, cfg) for s in (0, 25, 50, 100)] == [0.0, 1.0, 2.0, 2.0]
    full = grl("linear", hi=1.0, ramp_fraction=1.0)
    assert [grl_lambda(s, 10, full) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    # ramp_fraction 0: no ramp, hi from the first step
    assert grl_lambda(0, 10, grl("linear", hi=0.7, ramp_fraction=0.0)) == 0.7


def test_step_schedule():
    cfg = grl("step", hi=1.0, start=0.5)
    assert [grl_lambda(s, 100, cfg) for s in (0, 49, 50, 100)] == [0.0, 0.0, 1.0, 1.0]


def test_ganin_lr_annealing():
    cfg = OmegaConf.create({"schedule": "ganin", "alpha": 10.0, "beta": 0.75})
    assert lr_factor(0, 100, cfg) == 1.0
    assert lr_factor(50, 100, cfg) == pytest.approx(1 / 6**0.75)
    assert lr_factor(100, 100, cfg) == pytest.approx(1 / 11**0.75)
    assert lr_factor(7, 10, OmegaConf.create({"schedule": "constant"})) == 1.0


def test_poly_lr_decays_to_zero_at_the_last_step():
    cfg = OmegaConf.create({"schedule": "poly", "power": 0.9})
    assert lr_factor(0, 100, cfg) == 1.0
    assert lr_factor(50, 100, cfg) == pytest.approx(0.5**0.9)
    assert lr_factor(100, 100, cfg) == 0.0
    assert lr_factor(50, 100, make_cfg("optim.schedule=poly").optim) == pytest.approx(0.5**0.9)  # the shipped power


def test_unknown_schedules_are_refused():
    with pytest.raises(ValueError, match="warm_start"):
        grl_lambda(0, 10, grl("nope", hi=1.0))
    with pytest.raises(ValueError, match="inv"):
        lr_factor(0, 10, OmegaConf.create({"schedule": "nope"}))


def test_grl_configs_compose_with_overrides():
    cfg = make_cfg("grl=ganin", "grl.hi=0.3", "grl.gamma=5")
    assert grl_lambda(10, 10, cfg.grl) == pytest.approx(0.3 * (2 / (1 + math.exp(-5)) - 1))
    assert make_cfg("grl=linear", "grl.ramp_fraction=0.2").grl.ramp_fraction == 0.2
    assert grl_lambda(3, 10, make_cfg("grl=constant").grl) == 1.0
    warm = make_cfg("grl=warm_start", "grl.hi=0.5", "grl.max_iters=200").grl
    assert grl_lambda(400, 10_000, warm) == pytest.approx(0.5 * (2 / (1 + math.exp(-2)) - 1))
