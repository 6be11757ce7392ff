"""Small, reproducible experiments on real data that installs offline (demo and benchmarks).

Data: scikit-learn's digits (1797 8x8 images). Models: ``zoo.PatchViT``.
Everything is seeded; training runs on the CPU in seconds.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: int, seed: int) -> "Split":
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return Split(self.x[idx], self.y[idx])


def digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[Split, Split]:
    """sklearn digits as (train, test), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    return Split(x[idx[n_test:]], y[idx[n_test:]]), Split(x[idx[:n_test]], y[idx[:n_test]])


def fashion_mnist(root: str) -> tuple[Split, Split]:
    """Fashion-MNIST (60k train / 10k test, 28x28) from a folder of the idx .gz files
    (Debian's dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist)."""
    import gzip
    from pathlib import Path

    import numpy as np

    def read(name: str, offset: int) -> np.ndarray:
        path = Path(root) / name
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: apt-get install dataset-fashion-mnist")
        with gzip.open(path, "rb") as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)

    def split(kind: str) -> Split:
        x = torch.tensor(read(f"{kind}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28).copy(), dtype=torch.float32)
        y = torch.tensor(read(f"{kind}-labels-idx1-ubyte.gz", 8).copy(), dtype=torch.long)
        return Split(x / 255.0, y)

    return split("train"), split("t10k")


TASKS: dict[str, Callable[[Split], Split]] = {
    "rotate90": lambda s: Split(torch.rot90(s.x, 1, (1, 2)).contiguous(), s.y),
    "invert": lambda s: Split(1.0 - s.x, s.y),
    "flip": lambda s: Split(torch.flip(s.x, (2,)).contiguous(), s.y),
    "relabel": lambda s: Split(s.x, (s.y + 3) % 10),
}


def train(model: nn.Module, data: Split, *, epochs: int, lr: float = 3e-3, batch: int = 64, seed: int = 0,
          weight_decay: float = 0.0) -> nn.Module:
    """AdamW with a cosine schedule; deterministic given the seed."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(data) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, data: Split) -> tuple[float, float]:
    """(mean cross-entropy, accuracy)."""
    model.eval()
    logits = model(data.x)
    return float(F.cross_entropy(logits, data.y)), float((logits.argmax(-1) == data.y).float().mean())


def with_state(template: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(dict(state))
    return model.eval()


def lerp(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    return {k: (1 - t) * a[k] + t * b[k] if a[k].is_floating_point() else a[k] for k in a}


def barrier(template: nn.Module, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], data: Split,
            steps: int = 11) -> tuple[float, list[float], list[float]]:
    """Loss barrier along (1-l) a + l b: max over l of loss(l) minus the straight line; and the curves."""
    ts = [i / (steps - 1) for i in range(steps)]
    losses, accs = [], []
    for t in ts:
        loss, acc = evaluate(with_state(template, lerp(a, b, t)), data)
        losses.append(loss)
        accs.append(acc)
    line = [(1 - t) * losses[0] + t * losses[-1] for t in ts]
    return max(loss - mid for loss, mid in zip(losses, line)), losses, accs
