"""Helpers the training tests share: weights compared exactly, and a run that crashes mid-way."""
import torch


def weights(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


class Crash(RuntimeError):
    pass


def crash_after_first_epoch(report):
    """An on_epoch hook: the machine goes away after the first epoch's checkpoint."""
    if report.epoch == 1:
        raise Crash("the machine went away")
