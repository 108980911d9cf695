"""The original tutorial's training step, EMA and sampler, as functions tests can drive.

The original's ``train`` and ``inference`` draw their own randomness inside a loop; here
the same arithmetic takes ``t`` and the noise as arguments, so that a test can feed both
sides the same numbers. With no noise given, ``sample`` draws it like the original.
"""

from __future__ import annotations

import copy
import random
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

# The original's `times`: the reverse process is snapshotted at these t (plus the result).
REVERSE_TIMES = (0, 15, 50, 100, 200, 300, 400, 550, 700, 999)


def set_seed(seed: int = 42) -> None:
  torch.manual_seed(seed)
  torch.cuda.manual_seed_all(seed)
  torch.backends.cudnn.deterministic = True
  torch.backends.cudnn.benchmark = False
  np.random.seed(seed)
  random.seed(seed)


class ModelEma(nn.Module):
  """timm's ``ModelEmaV3`` as the original uses it (no warm-up, updated every step).

  ``update`` lerps every floating-point state entry toward the model's with weight
  ``1 - decay`` (``torch._foreach_lerp_``); the ``state_dict`` keys carry ``module.``.
  """

  def __init__(self, model: nn.Module, decay: float = 0.9999):
    super().__init__()
    self.module = copy.deepcopy(model)
    self.module.eval()
    self.decay = decay

  @torch.no_grad()
  def update(self, model: nn.Module) -> None:
    ema_values, model_values = [], []
    for ema_v, model_v in zip(self.module.state_dict().values(), model.state_dict().values()):
      if ema_v.is_floating_point():
        ema_values.append(ema_v)
        model_values.append(model_v)
      else:
        ema_v.copy_(model_v)
    torch._foreach_lerp_(ema_values, model_values, weight=1.0 - self.decay)


def pad_to_32(x: torch.Tensor) -> torch.Tensor:
  """The original's ``F.pad(x, (2, 2, 2, 2))`` of a 28x28 MNIST batch."""
  return F.pad(x, (2, 2, 2, 2))


def make_training(model: nn.Module, lr: float = 2e-5, ema_decay: float = 0.9999):
  """The original's optimizer, EMA and criterion for ``model``."""
  optimizer = optim.Adam(model.parameters(), lr=lr)
  ema = ModelEma(model, decay=ema_decay)
  criterion = nn.MSELoss(reduction="mean")
  return optimizer, ema, criterion


def train_step(model, optimizer, ema, criterion, scheduler, x: torch.Tensor, t: torch.Tensor,
               e: torch.Tensor) -> float:
  """One iteration of the original's training loop on a padded batch ``x`` in [0, 1]."""
  a = scheduler.alpha[t].view(x.shape[0], 1, 1, 1).to(x.device)
  x = (torch.sqrt(a) * x) + (torch.sqrt(1 - a) * e)
  output = model(x, t)
  optimizer.zero_grad()
  loss = criterion(output, e)
  loss.backward()
  optimizer.step()
  ema.update(model)
  return loss.item()


@torch.no_grad()
def sample(model, scheduler, z: torch.Tensor, noise: torch.Tensor | None = None,
           times: Sequence[int] = REVERSE_TIMES):
  """The original's ancestral sampler from ``z`` (x_T), returning (x_0, snapshots).

  ``noise[t]`` (shape ``[T, *z.shape]``) is the noise added after the update at step t
  (t >= 1; ``noise[0]`` is unused); ``None`` draws it with ``torch.randn`` as the original
  does. Snapshots are ``z`` after the mean update at each t in ``times`` (from t = T-1
  down), then the final image: the original's reverse-process strip.

  As in the original, ``z`` and the scheduler's tables stay where they are (the original
  keeps them on the CPU) and only the model call runs on the model's device:
  ``model(z.cuda(), t).cpu()``. A ``model`` that is a plain function gets ``z`` as it is.
  """
  device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else z.device
  num_time_steps = scheduler.beta.shape[0]
  images = []
  for step in reversed(range(1, num_time_steps)):
    t = [step]
    temp = scheduler.beta[t] / ((torch.sqrt(1 - scheduler.alpha[t])) *
                                (torch.sqrt(1 - scheduler.beta[t])))
    z = (1 / (torch.sqrt(1 - scheduler.beta[t]))) * z - (
        temp * model(z.to(device), t).to(z.device))
    if t[0] in times:
      images.append(z)
    e = torch.randn_like(z) if noise is None else noise[step]
    z = z + (e * torch.sqrt(scheduler.beta[t]))
  temp = scheduler.beta[0] / ((torch.sqrt(1 - scheduler.alpha[0])) *
                              (torch.sqrt(1 - scheduler.beta[0])))
  x = (1 / (torch.sqrt(1 - scheduler.beta[0]))) * z - (
      temp * model(z.to(device), [0]).to(z.device))
  images.append(x)
  return x, images
