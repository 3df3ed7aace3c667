"""Writes gpu_export.pt2 and gpu_export_io.npz: a BatchNorm CNN exported by torch.export on a GPU
(what a model trained and logged on a GPU box looks like), and the inputs and outputs it gave there.
tests/test_models.py checks that harden reads the archive on any machine and reproduces the outputs.
The committed files came from an NVIDIA H100 with torch 2.11.0+cu130; run this on a CUDA machine
to regenerate them:

    python tests/data/make_gpu_export.py
"""

from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                        torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(128, 10))

    def forward(self, x):
        return self.body(x)


torch.manual_seed(0)
net = Net().cuda().eval()
x = torch.rand(4, 3, 32, 32, device="cuda")
program = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
torch.export.save(program, str(HERE / "gpu_export.pt2"))
with torch.no_grad():
    np.savez(HERE / "gpu_export_io.npz", x=x.cpu().numpy(), y=net(x).cpu().numpy())
