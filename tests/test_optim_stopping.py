import itertools
import math

import pytest
import torch

from distres.components.optim import build_optimizer, lr_factor, param_groups
from distres.components.stopping import EarlyStopping
from distres.config import EarlyStopConfig, OptimConfig
from distres.models.resnet import resnet


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(warmup_epochs=2, warmup_start_factor=0.1, min_lr_factor=0.0)
    spe, epochs = 10, 10
    assert lr_factor(0, cfg, spe, epochs) == pytest.approx(0.1)
    assert lr_factor(10, cfg, spe, epochs) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(20, cfg, spe, epochs) == pytest.approx(1.0)
    assert lr_factor(60, cfg, spe, epochs) == pytest.approx(0.5)
    assert lr_factor(100, cfg, spe, epochs) == pytest.approx(0.0, abs=1e-12)
    values = [lr_factor(s, cfg, spe, epochs) for s in range(20, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_step_schedule_milestones_in_epochs_and_fractions():
    cfg = OptimConfig(schedule="step", warmup_epochs=0, step_milestones=[0.5, 8], step_gamma=0.1)
    assert lr_factor(49, cfg, 10, 10) == 1.0
    assert lr_factor(50, cfg, 10, 10) == pytest.approx(0.1)
    assert lr_factor(80, cfg, 10, 10) == pytest.approx(0.01)


def test_no_weight_decay_on_bn_and_bias():
    model = resnet("resnet20", num_classes=10)
    decay, no_decay = param_groups(model, 5e-4, no_wd_bn_bias=True)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    bn_and_bias = {id(p) for n, p in model.named_parameters() if "bn" in n or n.endswith("bias")}
    assert {id(p) for p in no_decay["params"]} == bn_and_bias
    assert len(param_groups(model, 5e-4, no_wd_bn_bias=False)) == 1


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars", "lamb"])
def test_optimizers_step(name):
    model = resnet("resnet20", num_classes=10)
    opt = build_optimizer(model, OptimConfig(name=name, lr=0.01), torch.device("cpu"))
    before = model.fc.weight.detach().clone()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.fc.weight)


def test_early_stopping_patience_and_state():
    es = EarlyStopping(EarlyStopConfig(patience=2, monitor="val/top1", min_delta=0.01))
    assert es.mode == "max" and es.best == -math.inf
    assert not es.update({"val/top1": 0.5}, 1)
    assert not es.update({"val/top1": 0.505}, 2)  # within min_delta: no improvement
    restored = EarlyStopping(EarlyStopConfig(patience=2, monitor="val/top1", min_delta=0.01))
    restored.load_state_dict(es.state_dict())
    assert restored.update({"val/top1": 0.4}, 3)  # second evaluation without improvement
    assert restored.best == 0.5 and restored.best_step == 1


def test_early_stopping_on_loss_minimises_and_zero_patience_never_stops():
    es = EarlyStopping(EarlyStopConfig(patience=1, monitor="val/loss"))
    assert es.mode == "min"
    assert not es.update({"val/loss": 1.0}, 1)
    assert not es.update({"val/loss": 0.5}, 2)
    assert es.update({"val/loss": 0.6}, 3)
    off = EarlyStopping(EarlyStopConfig(patience=0))
    assert not any(off.update({"val/top1": 0.1}, s) for s in range(10))


def test_poly_schedule_decays_to_the_floor():
    cfg = OptimConfig(schedule="poly", poly_power=2.0, warmup_epochs=1, min_lr_factor=0.0)
    spe, epochs = 10, 11  # 10 warm-up steps, then 100 decay steps
    assert lr_factor(10, cfg, spe, epochs) == pytest.approx(1.0)
    assert lr_factor(60, cfg, spe, epochs) == pytest.approx(0.25)  # (1 - 0.5) ** 2
    assert lr_factor(110, cfg, spe, epochs) == pytest.approx(0.0)
    linear = OptimConfig(schedule="poly", poly_power=1.0, warmup_epochs=1)
    assert lr_factor(35, linear, spe, epochs) == pytest.approx(0.75)


def test_lars_scales_each_decayed_layer_by_its_trust_ratio():
    """LARS's update of a decayed weight has norm lr * eta * |w| whatever the gradient's scale;
    BN weights and biases (not decayed) take plain SGD steps."""
    torch.manual_seed(0)
    model = resnet("resnet20", num_classes=10)
    cfg = OptimConfig(name="lars", lr=2.0, momentum=0.0, nesterov=False, weight_decay=1e-4,
                      trust_coeff=0.001)  # fmt: skip
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    (1000.0 * model(torch.randn(8, 3, 32, 32)).logsumexp(1).mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        step = (p.detach() - before[name]).norm()
        if p.ndim > 1:  # decayed: |step| = lr * eta * |w|, with the gradient 1000x scaled up
            assert step == pytest.approx(2.0 * 0.001 * before[name].norm(), rel=1e-3), name
        else:  # BN / bias: plain SGD
            assert step == pytest.approx(2.0 * grads[name].norm(), rel=1e-4), name


def test_after_a_signal_stop_a_repeated_signal_is_ignored_not_fatal():
    """Slurm's warning often reaches a rank twice (scancel --full, then the batch script's
    trap): once the run has stopped for it, a late repeat must not kill the rank while it
    writes its checkpoint and leaves. Without a signal, the old handlers come back."""
    import os
    import signal

    from distres.components.stopping import StopConsensus

    before = signal.getsignal(signal.SIGUSR1)
    try:
        quiet = StopConsensus(torch.device("cpu"))
        quiet.install_signal_handlers()
        quiet.restore_signal_handlers()
        assert signal.getsignal(signal.SIGUSR1) == before
        stopped = StopConsensus(torch.device("cpu"))
        stopped.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stopped.agree() == "preempted"
        stopped.restore_signal_handlers()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR1)  # the repeat: ignored, this process lives
    finally:
        signal.signal(signal.SIGUSR1, before)
