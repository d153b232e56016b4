"""The MobileNetV2 network the benchmarks export (torch; random weights, BN statistics set).

Inverted residual blocks of width 1.0 as in the paper; every BN gets moving statistics a trained
network could have, so that folding changes the weights. Imported by the benchmark scripts, which
run with this folder on ``sys.path``.
"""

from __future__ import annotations

# (expansion t, output channels c, repeats n, first stride s) of MobileNetV2.
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1)]


def mobilenet_v2(seed: int = 0, *, mean_spread: float = 0.1, affine: bool = False):
    """A `torch.nn.Sequential` MobileNetV2 in eval mode.

    Each BN's moving mean is drawn from U(-mean_spread, mean_spread) and its variance from
    U(0.5, 2); with ``affine`` also gamma from U(0.5, 1.5) and beta from U(-0.2, 0.2).
    """
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1, relu: bool = True) -> list:
        layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return layers + [nn.ReLU6()] if relu else layers

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
            super().__init__()
            hidden = cin * t
            layers = conv_bn(cin, hidden, 1, 1) if t != 1 else []
            layers += conv_bn(hidden, hidden, 3, stride, groups=hidden) + conv_bn(hidden, cout, 1, 1, relu=False)
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    torch.manual_seed(seed)
    blocks, cin = conv_bn(3, 32, 3, 2), 32
    for t, c, n, s in SETTINGS:
        for i in range(n):
            blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    blocks += conv_bn(cin, 1280, 1, 1)
    net = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000)).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-mean_spread, mean_spread)
                module.running_var.uniform_(0.5, 2.0)
                if affine:
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
    return net
