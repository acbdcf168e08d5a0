"""Train/eval mode of a model's modules, kept per module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, then every module back in its own mode.

    ``model.train(was)`` would set every submodule to the root's mode, switching back on a dropout
    the user had put in eval mode (or off a head left in train mode).
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode
