"""rcomp.autoattack: pyautoattack wired to rcomp's models, per-image verdicts, bad settings refused."""

import pytest
import torch
from torch import nn

from rcomp.autoattack import autoattack_correct
from rcomp.errors import RcompError


class _Constant(nn.Module):
    """Logits that ignore the input: no attack can change the prediction."""

    def __init__(self, num_classes: int, label: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_classes))
        with torch.no_grad():
            self.bias[label] = 5.0

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)


def _linear(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes))


def test_an_input_independent_model_stays_correct_and_misclassified_images_count_as_broken():
    model = _Constant(4, label=2)
    x = torch.rand(12, 3, 8, 8)
    y = torch.tensor([2] * 8 + [1] * 4)
    correct = autoattack_correct(model, x, y, 8 / 255, num_classes=4)
    assert correct.dtype == torch.bool and correct.tolist() == [True] * 8 + [False] * 4


def test_a_large_eps_breaks_a_linear_model_and_no_more_than_pgd_survives():
    from rcomp.attacks import pgd

    model = _linear().eval()
    x = torch.rand(64, 3, 8, 8)
    y = model(x).argmax(1)  # every image correct clean
    small = autoattack_correct(model, x, y, 2 / 255, num_classes=4)
    large = autoattack_correct(model, x, y, 0.5, num_classes=4)
    assert large.sum() == 0
    assert small.sum() >= large.sum()
    x_pgd = pgd(model, x, y, eps=2 / 255, alpha=0.5 / 255, steps=10)
    with torch.no_grad():
        pgd_correct = model(x_pgd).argmax(1) == y
    assert small.sum() <= pgd_correct.sum()  # the stronger attack leaves at most as many images


@pytest.mark.parametrize("kwargs", [dict(eps=0.0), dict(eps=float("nan")), dict(version="plus")])
def test_bad_settings_are_one_line_errors(kwargs):
    settings = dict(eps=8 / 255, version="fast") | kwargs
    eps = settings.pop("eps")
    with pytest.raises(RcompError):
        autoattack_correct(_linear(), torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), eps,
                           num_classes=4, **settings)
