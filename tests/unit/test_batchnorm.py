"""BatchNorm re-estimation: a low-momentum model whose eval-mode predictions collapse gets them back."""
import pytest
import torch
from torch import nn

from edgekd.config import from_dict
from edgekd.data import build_splits
from edgekd.distill.batchnorm import reestimate_bn


@pytest.fixture(autouse=True)
def _one_thread():
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)


@pytest.fixture(scope="module")
def splits():
    return build_splits(from_dict({"data": {"image_size": 8}}).data, 0)


def _net(channels: int, momentum: float = 3e-4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=momentum), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32, momentum=momentum), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(32, 10))


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train_mode: bool) -> float:
    was = model.training
    model.train(train_mode)
    acc = float((model(x).argmax(1) == y).float().mean() * 100)
    model.train(was)
    return acc


def test_reestimation_restores_eval_accuracy_of_a_low_momentum_model(splits):
    model = _net(splits.input_shape[0])  # MNASNet's momentum: running statistics barely move in 60 steps
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(splits.train), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(splits.train.x[idx]), splits.train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = splits.test.x, splits.test.y
    train_mode = _accuracy(model, x, y, True)
    assert train_mode > 60, train_mode  # the weights learned
    before = _accuracy(model, x, y, False)
    assert before < 20, before  # yet eval mode is near chance (10 classes)

    used = reestimate_bn(model, splits.train.x, seed=0, batch_size=64)
    after = _accuracy(model, x, y, False)
    assert used == len(splits.train)
    assert after >= train_mode - 5 and after > 60, (before, after, train_mode)
    assert model.training  # the module's mode and every layer's momentum are as they were
    assert [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == [3e-4, 3e-4]


def test_bounded_deterministic_without_dropout_and_modes_kept(splits):
    model = nn.Sequential(nn.Dropout(0.5), _net(splits.input_shape[0], momentum=0.1))
    model.eval()
    model[1][1].train()  # a mixed state is given back as it was
    modes = [m.training for m in model.modules()]
    assert reestimate_bn(model, splits.train.x, seed=3, batch_size=16, max_samples=100) == 100
    first = {k: v.clone() for k, v in model.state_dict().items()}
    assert reestimate_bn(model, splits.train.x, seed=3, batch_size=16, max_samples=100) == 100
    # the same subset and dropout off during the pass: identical statistics, counted from zero
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
    assert int(model[1][1].num_batches_tracked) == 100 // 16
    assert [m.training for m in model.modules()] == modes and sum(modes) == 1


def test_no_batchnorm_is_a_no_op(splits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(splits.train.x[0].numel(), 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert reestimate_bn(model, splits.train.x) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
