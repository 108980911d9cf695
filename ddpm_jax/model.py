"""The original tutorial's UNET as a Flax linen module, in NHWC.

Layer for layer the PyTorch original (see ``reference_torch``): sub-modules carry the
original's names (``Layer2.attention_layer.proj1`` ...), so a ``state_dict`` key maps to a
parameter path one to one (``ddpm_jax.convert``). One deliberate difference: the original
applies attention dropout even in eval mode; here dropout runs only with ``train=True``,
so sampling is deterministic.

With ``num_classes > 0`` the UNet is class-conditional (classifier-free guidance, Ho &
Salimans 2022): a learned class embedding is added to the time embedding row that every
ResBlock receives, and one extra row stands for "no class". With ``num_classes = 0``, the
default, it is the original, parameter for parameter.

Parameters start as PyTorch's do (``Conv2d``, ``ConvTranspose2d`` and ``Linear`` defaults):
weights uniform in +-1/sqrt(fan_in) (``kaiming_uniform_(a=sqrt(5))``), biases likewise, with
PyTorch's fan_in; GroupNorm scales 1 and offsets 0. Flax's own defaults (lecun_normal, zero
biases) would start the original's training from weights ~1.7x larger and an initial loss
2-4x as high.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.errors import UserError

# A label meaning "no class" (the unconditional model of classifier-free guidance); the
# UNet reads it, and labels >= 0 are classes. It selects the embedding row ``num_classes``.
NO_CLASS = -1
# The class embedding's rows are multiplied by this before they are added to the time
# embedding. Adam moves a parameter by about the learning rate a step whatever its
# gradient's size, so rows starting at zero would need ~1/lr steps to reach the unit
# scale of the sinusoidal table they shift; scaled by 10 they move 10x as fast, and the
# demo's conditional run learns its labels (RESULTS.md, "Draw a chosen digit").
CLASS_EMBED_SCALE = 10.0
# PyTorch's GroupNorm default.
GROUP_NORM_EPS = 1e-5
# PyTorch's default weight init, kaiming_uniform_(a=sqrt(5)): uniform in +-1/sqrt(fan_in),
# fan_in being the input features times the kernel's taps (Flax's fan_in for a kernel laid
# out [..., in, out]; for UpConv's [4, 4, out, in] kernel, out * 16, as torch takes it).
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default bias init for a layer of ``fan_in``: uniform in +-1/sqrt(fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def sinusoidal_embeddings(time_steps: int, dim: int) -> np.ndarray:
  """The original's fixed ``[time_steps, dim]`` table: sin in even, cos in odd columns.

  Computed in float32 numpy exactly as the original's formula. Another library's float32
  ``exp``/``sin`` may differ by an ulp, which times t up to 999 gives ~6e-5.
  """
  position = np.arange(time_steps, dtype=np.float32)[:, None]
  div = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / dim)))
  table = np.zeros((time_steps, dim), dtype=np.float32)
  table[:, 0::2] = np.sin(position * div)
  table[:, 1::2] = np.cos(position * div)
  return table


def _conv(in_features: int, features: int, kernel: int, dtype: Any, name: str,
          stride: int = 1) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), dtype=dtype, kernel_init=TORCH_KERNEL_INIT,
                 bias_init=torch_bias_init(in_features * kernel * kernel), name=name)


def _dense(in_features: int, features: int, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=TORCH_KERNEL_INIT,
                  bias_init=torch_bias_init(in_features), name=name)


def _group_norm(num_groups: int, dtype: Any, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=num_groups, epsilon=GROUP_NORM_EPS, dtype=dtype,
                      use_fast_variance=False, name=name)


class ResBlock(nn.Module):
  """x += emb[:C]; r = conv1(relu(gn1(x))); dropout; r = conv2(relu(gn2(r))); r + x."""
  num_groups: int
  dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    c = x.shape[-1]
    x = x + emb[:, None, None, :c].astype(x.dtype)
    gnorm = lambda name: _group_norm(self.num_groups, self.dtype, name)
    r = _conv(c, c, 3, self.dtype, "conv1")(nn.relu(gnorm("gnorm1")(x)))
    r = nn.Dropout(self.dropout_rate, deterministic=not train)(r)
    r = _conv(c, c, 3, self.dtype, "conv2")(nn.relu(gnorm("gnorm2")(r)))
    return r + x


class Attention(nn.Module):
  """Multi-head self-attention over H*W positions, with the original's channel layout.

  ``proj1``'s 3C outputs are laid out (C, heads, qkv) with qkv innermost, and the heads'
  outputs are merged back as (C, heads): the original's einops patterns
  ``b L (C H K) -> K b H L C`` and ``b H (h w) C -> b h w (C H)``. No residual, no norm.
  """
  num_heads: int
  dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    b, h, w, c = x.shape
    heads = self.num_heads
    qkv = _dense(c, 3 * c, self.dtype, "proj1")(x.reshape(b, h * w, c))
    # [b, L, head_dim, heads, qkv] -> three [b, heads, L, head_dim]. Heads first, one code
    # path for training and sampling: on a CPU it runs faster than
    # jax.nn.dot_product_attention (XLA's implementation; BENCHMARKS.md).
    q, k, v = jnp.transpose(qkv.reshape(b, h * w, c // heads, heads, 3), (4, 0, 3, 1, 2))
    scale = jnp.asarray(1.0 / math.sqrt(c // heads), q.dtype)
    # Logits and softmax in float32 whatever the compute dtype, as dot_product_attention.
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if train and self.dropout_rate > 0.0:
      weights = nn.Dropout(self.dropout_rate, deterministic=False)(weights)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
    # [b, heads, L, head_dim] -> [b, L, head_dim, heads]: the original's (C, heads) merge.
    out = jnp.transpose(out, (0, 2, 3, 1)).reshape(b, h, w, c)
    return _dense(c, c, self.dtype, "proj2")(out)


# Up-sampling taps: output row 2j + a of PyTorch's ConvTranspose2d(k=4, stride=2, padding=1)
# reads input row j + d through kernel row _UP_TAPS[a][d] (and likewise for columns).
_UP_TAPS = ({-1: 3, 0: 1}, {0: 2, 1: 0})


def phase_taps(kernel: jax.Array) -> jax.Array:
  """The ``(3, 3, C, 4 * F)`` weight of :class:`UpConv`'s one 3x3 convolution, from its
  ``(4, 4, F, C)`` kernel: output channel ``(2 * a + b) * F + f`` is phase ``(a, b)``, each
  3x3 position holding its kernel tap or zeros.

  Built as one stack of the 36 ``(C, F)`` blocks, which XLA fuses into one kernel (and
  whose gradient is slices): 16 in-place ``.at[].set`` scatters instead cost a copy of the
  whole weight each, 16 per UpConv and step.
  """
  _, _, f, c = kernel.shape
  zeros = jnp.zeros((c, f), kernel.dtype)
  blocks = [kernel[_UP_TAPS[a][dy], _UP_TAPS[b][dx]].T
            if dy in _UP_TAPS[a] and dx in _UP_TAPS[b] else zeros
            for dy in (-1, 0, 1) for dx in (-1, 0, 1) for a in (0, 1) for b in (0, 1)]
  taps = jnp.stack(blocks).reshape(3, 3, 2, 2, c, f).transpose(0, 1, 4, 2, 3, 5)
  return taps.reshape(3, 3, c, 4 * f)


class UpConv(nn.Module):
  """PyTorch's ``ConvTranspose2d(C, features, 4, stride=2, padding=1)``, computed fast.

  The parameters are those of ``nn.ConvTranspose(features, (4, 4), strides=(2, 2),
  padding=((2, 2), (2, 2)), transpose_kernel=True)`` — ``kernel`` ``(4, 4, features, C)`` is
  the torch weight ``(C, features, 4, 4)`` transposed — and so is the result. But XLA's CPU
  backend runs that input-dilated convolution several times slower than a plain one
  (forward and gradient; BENCHMARKS.md), so each of the four output phases (row and column
  parity) is read off one 3x3 convolution with ``4 * features`` outputs, then interleaved
  (depth-to-space).
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c, f = x.shape[-1], self.features
    kernel = self.param("kernel", TORCH_KERNEL_INIT, (4, 4, f, c))
    bias = self.param("bias", torch_bias_init(16 * f), (f,))
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), phase_taps(kernel.astype(self.dtype)), (1, 1),
        ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    n, h, w, _ = y.shape
    y = y.reshape(n, h, w, 2, 2, f).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, f)
    return y + bias.astype(self.dtype)


class UnetLayer(nn.Module):
  """ResBlock1 -> (Attention) -> ResBlock2; returns (down/up-sampled x, x)."""
  upscale: bool
  attention: bool
  num_groups: int
  dropout_rate: float
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    c = x.shape[-1]
    block = lambda name: ResBlock(self.num_groups, self.dropout_rate, self.dtype, name=name)
    x = block("ResBlock1")(x, emb, train)
    if self.attention:
      x = Attention(self.num_heads, self.dropout_rate, self.dtype, name="attention_layer")(x, train)
    x = block("ResBlock2")(x, emb, train)
    if self.upscale:
      conv = UpConv(c // 2, self.dtype, name="conv")
    else:
      conv = _conv(c, 2 * c, 3, self.dtype, "conv", stride=2)
    return conv(x), x


class UNet(nn.Module):
  """The original UNET. ``x``: float ``[B, H, W, C]``, ``t``: int ``[B]`` -> ``[B, H, W, out]``.

  ``dtype`` is the compute dtype; parameters stay float32 and the output is float32.

  ``num_classes > 0`` adds ``class_embed``, an ``nn.Embed(num_classes + 1, max(channels))``
  whose row for ``labels`` (int ``[B]``), times :data:`CLASS_EMBED_SCALE`, is added to the
  sinusoidal time embedding before each layer slices its ``[:C]``, so the original's wiring
  is unchanged. Row ``num_classes`` is "no class": ``labels`` None, or a label of
  :data:`NO_CLASS` (or ``num_classes``), selects it; that is the model classifier-free
  guidance calls unconditional. The rows start at zero: a fresh conditional UNet is then
  the same function as the unconditional one with the same other parameters (which do not
  depend on ``num_classes``: Flax draws each module's init from its own name), so
  conditioning starts from the original's model, not from a random shift of every time
  embedding; and since the row is added, not multiplied, its gradient is non-zero from the
  first step and differs by class, which breaks the rows' symmetry. With ``num_classes =
  0`` there is no embedding and ``labels`` is ignored.
  """
  channels: Sequence[int] = (64, 128, 256, 512, 512, 384)
  attentions: Sequence[bool] = (False, True, False, False, False, True)
  upscales: Sequence[bool] = (False, False, False, True, True, True)
  num_groups: int = 32
  dropout_rate: float = 0.1
  num_heads: int = 8
  out_channels: int = 1
  time_steps: int = 1000
  dtype: Any = jnp.float32
  num_classes: int = 0

  @nn.compact
  def __call__(self, x, t, labels=None, train: bool = False):
    num_layers = len(self.channels)
    table = jnp.asarray(sinusoidal_embeddings(self.time_steps, max(self.channels)))
    emb = table[t]
    if self.num_classes > 0:
      if labels is None:
        labels = jnp.full(jnp.shape(t), self.num_classes, jnp.int32)
      else:
        labels = jnp.where(labels < 0, self.num_classes, labels)
      rows = nn.Embed(self.num_classes + 1, table.shape[1],
                      embedding_init=nn.initializers.zeros, name="class_embed")(labels)
      emb = emb + CLASS_EMBED_SCALE * rows
    x = _conv(x.shape[-1], self.channels[0], 3, self.dtype, "shallow_conv")(x.astype(self.dtype))
    residuals = []
    for i in range(num_layers):
      layer = UnetLayer(self.upscales[i], self.attentions[i], self.num_groups, self.dropout_rate,
                        self.num_heads, self.dtype, name=f"Layer{i + 1}")
      if i < num_layers // 2:
        x, r = layer(x, emb, train)
        residuals.append(r)
      else:
        x = jnp.concatenate([layer(x, emb, train)[0], residuals[num_layers - i - 1]], axis=-1)
    late = (self.channels[-1] // 2 + self.channels[0]) // 2
    x = nn.relu(_conv(x.shape[-1], late, 3, self.dtype, "late_conv")(x))
    x = _conv(late, self.out_channels, 1, self.dtype, "output_conv")(x)
    return x.astype(jnp.float32)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_unet(model_config) -> UNet:
  """A ``UNet`` from a config's ``model`` section (a mapping of the ``UNet`` fields).

  ``dtype`` may be a name ('float32', 'bfloat16', 'float16'); sequences become tuples.
  """
  fields = dict(model_config)
  dtype = fields.get("dtype", "float32")
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise UserError(f"model.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    fields["dtype"] = _DTYPES[dtype]
  for key in ("channels", "attentions", "upscales"):
    if key in fields:
      fields[key] = tuple(fields[key])
  return UNet(**fields)
