"""rcomp.count: fvcore MACs / params against closed forms, and the not-counted bookkeeping."""

import torch
from torch import nn

from rcomp.count import CostReport, count_model, sparse_macs
from rcomp.models import create_model


def _cifar_resnet_closed_form(depth: int, num_classes: int = 10) -> tuple[int, int]:
    """conv + fc MACs and all params of the option-B CIFAR ResNet (1x1 projections at 2 transitions)."""
    n = (depth - 2) // 6
    macs = 9 * 3 * 16 * 32 * 32  # stem
    params = 9 * 3 * 16 + 2 * 16  # stem conv + bn
    in_planes = 16
    for planes, hw in ((16, 32), (32, 16), (64, 8)):
        for i in range(n):
            cin = in_planes if i == 0 else planes
            macs += 9 * cin * planes * hw * hw + 9 * planes * planes * hw * hw
            params += 9 * cin * planes + 9 * planes * planes + 2 * (2 * planes)
            if i == 0 and cin != planes:  # projection shortcut: 1x1 conv (stride 2) + BN
                macs += cin * planes * hw * hw
                params += cin * planes + 2 * planes
        in_planes = planes
    macs += 64 * num_classes
    params += 64 * num_classes + num_classes
    return macs, params


def test_single_conv_closed_form():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    report = count_model(model, (3, 16, 16))
    assert report.macs == 3 * 8 * 9 * 16 * 16
    assert report.params == 3 * 8 * 9 + 8
    assert [(l.name, l.kind, l.macs) for l in report.layers] == [("0", "Conv2d", 3 * 8 * 9 * 256)]


def test_strided_conv_and_linear_closed_form():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 8 * 8, 7))
    report = count_model(model, (1, 2, 16, 16))
    assert report.macs == 2 * 4 * 9 * 8 * 8 + 256 * 7
    assert report.params == 2 * 4 * 9 + 256 * 7 + 7
    linear_only = count_model(nn.Linear(20, 5), (20,))
    assert (linear_only.macs, linear_only.params) == (100, 105)


def test_resnet20_dense_is_the_option_b_figure():
    model = create_model("resnet20")
    model.train()
    report = count_model(model, (3, 32, 32))
    assert (report.macs, report.params) == _cifar_resnet_closed_form(20) == (40_813_184, 272_474)
    assert model.training  # mode restored
    # not counted, but listed: BN folded, residual adds, normalization, activations, the pool
    nc = report.not_counted
    assert nc["batch_norm"] == 21 and nc["add"] == 9 and nc["adaptive_avg_pool2d"] == 1
    assert nc["sub"] == 1 and nc["div"] == 1 and nc.get("relu_", 0) + nc.get("relu", 0) == 19
    assert abs(report.mops - 40.813184) < 1e-9
    bn = [l for l in report.layers if l.kind == "BatchNorm2d"]
    assert len(bn) == 21 and all(l.macs == 0 for l in bn)
    assert sum(l.macs for l in report.layers) == report.macs
    assert sum(l.params for l in report.layers) == report.params


def test_resnet56_matches_closed_form():
    report = count_model(create_model("resnet56"), (3, 32, 32))
    assert (report.macs, report.params) == _cifar_resnet_closed_form(56) == (125_747_840, 855_770)


def test_report_dict_and_table():
    report = count_model(create_model("tiny_cnn"), (3, 32, 32))
    assert isinstance(report, CostReport)
    d = report.to_dict()
    assert d["macs"] == report.macs and d["params"] == report.params and "BatchNorm" in d["convention"]
    table = report.to_table()
    assert "total" in table and "net.conv_a" in table and "not counted" in table


def test_sparse_macs_counts_nonzero_weights_times_positions():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight[:4] = 0
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(8 * 16 * 16, 3))
    with torch.no_grad():
        model[2].weight[0] = 0
    assert sparse_macs(model, (3, 16, 16)) == 4 * 27 * 256 + 2 * 8 * 256
    assert count_model(model, (3, 16, 16)).macs == 8 * 27 * 256 + 3 * 8 * 256  # fvcore: dense
