"""A faithful copy of the original PyTorch DDPM tutorial, used only by tests and benchmarks.

Numerically the original: same classes, constructor arguments, forward behaviour, quirks
and ``state_dict`` keys. ``ddpm_jax`` never imports this package.
"""

from reference_torch.model import (
    Attention,
    DDPM_Scheduler,
    ResBlock,
    SinusoidalEmbeddings,
    UNET,
    UnetLayer,
)
from reference_torch.original import (
    REVERSE_TIMES,
    ModelEma,
    make_training,
    pad_to_32,
    sample,
    set_seed,
    train_step,
)

__all__ = [
    "Attention",
    "DDPM_Scheduler",
    "ModelEma",
    "REVERSE_TIMES",
    "ResBlock",
    "SinusoidalEmbeddings",
    "UNET",
    "UnetLayer",
    "make_training",
    "pad_to_32",
    "sample",
    "set_seed",
    "train_step",
]
