"""XDistillation's convolutional auto-encoders (CAE) and their phase-1 training.

Source: Alharbi, Vu & Thai, "Learning Interpretation with Explainable Knowledge Distillation", IEEE
BigData 2021, §III-A2: eq. 1-2 (tanh encoder/decoder), eq. 4 (the MAE loss) and Table I (the small
and large CAE). :mod:`xkd.distill.xdistill` trains a CAE on the teacher's explanations, freezes it
and fuses it into the student.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.errors import ConfigError


class CAE(nn.Module):
    """A conv auto-encoder mapping an image ``(N, C, H, W)`` to one map ``(N, 1, H, W)`` in [-1, 1]
    (tanh after every layer, eq. 1-2). The input is zero-padded at the bottom/right to a multiple of
    the total down-sampling ``factor`` and the output cropped back, so any image size works.

    ``small`` (Table I, "Small_CAE"): conv3x3 C->16, tanh, max-pool 2, conv3x3 16->4, tanh, max-pool 2,
    transposed conv 2x2/2 4->16, tanh, transposed conv 2x2/2 16->1, tanh: 1,077 parameters for C = 1.

    ``large`` (Table I, "Large_CAE"): four conv 4x4/2 (padding 1) C->16->32->64->64 and four transposed
    conv 4x4/2 (padding 1) 64->64->32->16->1, tanh after each: 214 k parameters for C = 3 (the paper's
    channel widths are not given; its count is 198,796).
    """

    def __init__(self, in_channels: int, size: Literal["small", "large"] = "small") -> None:
        super().__init__()
        act = nn.Tanh
        if size == "small":
            self.factor = 4
            self.encoder = nn.Sequential(
                nn.Conv2d(in_channels, 16, 3, padding=1), act(), nn.MaxPool2d(2),
                nn.Conv2d(16, 4, 3, padding=1), act(), nn.MaxPool2d(2),
            )  # fmt: skip
            self.decoder = nn.Sequential(
                nn.ConvTranspose2d(4, 16, 2, stride=2), act(), nn.ConvTranspose2d(16, 1, 2, stride=2), act()
            )
        elif size == "large":
            self.factor = 16
            widths = [in_channels, 16, 32, 64, 64]
            enc: list[nn.Module] = []
            for a, b in zip(widths[:-1], widths[1:]):
                enc += [nn.Conv2d(a, b, 4, stride=2, padding=1), act()]
            dec: list[nn.Module] = []
            back = widths[::-1][:-1] + [1]
            for a, b in zip(back[:-1], back[1:]):
                dec += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1), act()]
            self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        else:
            raise ConfigError(f"cae {size!r} is not allowed; allowed values: 'small', 'large'")

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.factor, (-w) % self.factor
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return self.decoder(self.encoder(x))[..., :h, :w]


def train_cae(
    cae: CAE, images: Tensor, targets: Tensor, *, epochs: int, lr: float, batch_size: int, seed: int = 0
) -> list[float]:
    """Fit ``cae`` image -> target map ``(N, H, W)`` with the L1 loss (eq. 4) and Adam for ``epochs``
    epochs of shuffled mini-batches (seeded by ``seed``); returns the mean loss per epoch. The CAE
    ends frozen (``requires_grad=False``) and in eval mode."""
    cae.requires_grad_(True)
    cae.train()
    opt = torch.optim.Adam(cae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g).to(images.device)  # one copy per epoch
        total = torch.zeros((), dtype=torch.float64, device=images.device)  # read once per epoch: no sync per step
        for idx in order.split(batch_size):
            loss = F.l1_loss(cae(images[idx])[:, 0], targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach().double() * len(idx)
        history.append(float(total) / len(images))
    opt.zero_grad(set_to_none=True)
    cae.requires_grad_(False)
    cae.eval()
    return history
