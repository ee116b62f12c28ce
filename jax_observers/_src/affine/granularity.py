r"""torchao's granularities and the block grid they define over an input shape.

A granularity names which elements share one ``(scale, zero_point)``. torchao turns it into a
``block_size`` of the input's rank (:func:`get_block_size`); a block of size :math:`b_i` along axis
:math:`i` of size :math:`n_i` splits that axis into :math:`n_i / b_i` blocks (:math:`b_i = 1`: every
index is its own block; :math:`b_i = n_i`: one block, and the axis disappears from the qparams).

Observers add two things torchao does not have (:func:`block_layout`):

* **token axes.** The first ``token_axes`` axes of the input index tokens (batch, sequence). The
  statistic of every block is reduced over them, so the state has the shape of the grid over the
  remaining axes and never depends on the token count: :math:`m_{g} = \min_{t} \min_{i \in B_{t,g}}
  x_i`, the min over the tokens of the per-token block minima, which is the min over their union.
* **padding.** With ``pad=True`` an axis that the block does not divide gets
  :math:`\lceil n_i / b_i \rceil` blocks, the last one partial, as ModelOpt and ONNX Runtime do
  (torchao raises). The partial block is padded with copies of its own last element, so its min and
  max are those of its real elements.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


def _check_positive_int(name: str, value, where: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{where}: {name}={value!r} must be a positive int.")


@dataclasses.dataclass(frozen=True)
class Granularity:
  """Base of torchao's granularities (frozen, hashable, comparable)."""


@dataclasses.dataclass(frozen=True)
class PerTensor(Granularity):
  """One block: the whole tensor (``block_size = x.shape``)."""


@dataclasses.dataclass(frozen=True)
class PerAxis(Granularity):
  """One block per index of ``axis`` (the other axes are reduced); negative counts from the end."""

  axis: int

  def __post_init__(self):
    if isinstance(self.axis, bool) or not isinstance(self.axis, int):
      raise ValueError(f"PerAxis: axis={self.axis!r} must be an int.")


@dataclasses.dataclass(frozen=True)
class PerGroup(Granularity):
  """Groups of ``group_size`` consecutive elements along the last axis (``(1, ..., 1, group_size)``).

  torch 2.13 accepts only 2-D inputs; here any rank >= 1 works, the groups always on the last axis.
  """

  group_size: int

  def __post_init__(self):
    _check_positive_int("group_size", self.group_size, "PerGroup")


@dataclasses.dataclass(frozen=True)
class PerRow(Granularity):
  """One block per row: the whole of axis ``dim`` (default the last), every other index its own."""

  dim: int = -1

  def __post_init__(self):
    if isinstance(self.dim, bool) or not isinstance(self.dim, int):
      raise ValueError(f"PerRow: dim={self.dim!r} must be an int.")


@dataclasses.dataclass(frozen=True)
class PerToken(Granularity):
  """One block per token: the last axis whole, one block per index of every leading axis."""


@dataclasses.dataclass(frozen=True)
class PerBlock(Granularity):
  """Blocks of ``block_size`` over the trailing axes (left-padded with 1s to the input's rank).

  ``PerBlock((1, 128))`` is ``PerGroup(128)`` on a 2-D input; ``PerBlock((128, 128))`` is the fp8
  2-D weight block. A full-rank ``block_size`` is torchao's ``block_size`` argument as is.
  """

  block_size: tuple[int, ...]

  def __post_init__(self):
    if not isinstance(self.block_size, (tuple, list)) or not self.block_size:
      raise ValueError(f"PerBlock: block_size={self.block_size!r} must be a non-empty tuple.")
    object.__setattr__(self, "block_size", tuple(self.block_size))
    for b in self.block_size:
      _check_positive_int("block_size entry", b, f"PerBlock(block_size={self.block_size})")


def get_block_size(shape: tuple[int, ...], granularity: Granularity) -> tuple[int, ...]:
  """torchao's ``get_block_size``: the block shape ``granularity`` gives an input of ``shape``.

  The same tuple as torchao 0.18's ``torchao.quantization.utils.get_block_size`` (tested live);
  torchao asserts there that ``PerGroup``/``PerBlock`` divide the shape, jo in :func:`block_layout`
  (which also offers ``pad``). A block of all ones is one block per element here, where torchao's
  reduction over an empty dim list (``torch.amin(v, dim=[])``) collapses the whole tensor.

  Examples:
    >>> import jax_observers as jo
    >>> jo.get_block_size((4, 256), jo.PerGroup(128)), jo.get_block_size((2, 3, 8), jo.PerToken())
    ((1, 128), (1, 1, 8))
  """
  shape = tuple(int(n) for n in shape)
  n = len(shape)
  if not isinstance(granularity, Granularity):
    raise TypeError(f"granularity={granularity!r} is not a jo.Granularity (PerTensor(), ...).")
  if isinstance(granularity, PerTensor):
    return shape
  if n == 0:
    raise ValueError(f"{granularity} needs an input of rank >= 1; got shape {shape}.")
  if isinstance(granularity, (PerAxis, PerRow)):
    axis = granularity.axis if isinstance(granularity, PerAxis) else granularity.dim
    if not -n <= axis < n:
      raise ValueError(f"{granularity} is out of range for an input of shape {shape}.")
    if isinstance(granularity, PerAxis):
      return tuple(1 if i == axis % n else s for i, s in enumerate(shape))
    return tuple(s if i == axis % n else 1 for i, s in enumerate(shape))
  if isinstance(granularity, PerGroup):
    return (1,) * (n - 1) + (granularity.group_size,)
  if isinstance(granularity, PerToken):
    return (1,) * (n - 1) + (shape[-1],)
  if isinstance(granularity, PerBlock):
    if len(granularity.block_size) > n:
      raise ValueError(f"{granularity} has more axes than an input of shape {shape}.")
    return (1,) * (n - len(granularity.block_size)) + granularity.block_size
  raise TypeError(f"granularity={granularity!r} is not supported.")


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """How an input is padded and viewed so each block's statistic is one reduction.

  ``view_shape`` is torchao's ``shape_for_reduction`` (each split axis becomes ``(blocks, block)``);
  ``stat_axes`` are the view axes a statistic reduces (inside blocks, whole axes and token axes);
  the remaining view axes, in order, give ``state_shape``.
  """

  shape: tuple[int, ...]  # the input's shape
  pad_widths: tuple[int, ...]  # elements appended at the end of each input axis
  view_shape: tuple[int, ...]  # the padded input reshaped
  stat_axes: tuple[int, ...]  # view axes reduced into one statistic per block

  @property
  def state_shape(self) -> tuple[int, ...]:
    """The shape of one statistic per block (token axes reduced away)."""
    return tuple(s for a, s in enumerate(self.view_shape) if a not in self.stat_axes)

  @property
  def broadcast_shape(self) -> tuple[int, ...]:
    """``view_shape`` with the reduced axes set to 1: qparams in this shape broadcast to the view."""
    return tuple(1 if a in self.stat_axes else s for a, s in enumerate(self.view_shape))

  def view(self, x: jax.Array) -> jax.Array:
    """``x`` padded (edge values: they cannot change a block's min or max) and reshaped."""
    if any(self.pad_widths):
      x = jnp.pad(x, [(0, p) for p in self.pad_widths], mode="edge")
    return jnp.reshape(x, self.view_shape)

  def unview(self, v: jax.Array) -> jax.Array:
    """Inverse of :meth:`view`: back to the input's shape (padding dropped)."""
    padded = tuple(s + p for s, p in zip(self.shape, self.pad_widths, strict=True))
    v = jnp.reshape(v, padded)
    if any(self.pad_widths):
      v = v[tuple(slice(0, s) for s in self.shape)]
    return v

  def broadcast(self, params: jax.Array) -> jax.Array:
    """Per-block ``params`` (``state_shape``) reshaped to broadcast against the view."""
    return jnp.reshape(params, self.broadcast_shape)


def default_token_axes(granularity: Granularity, ndim: int) -> int:
  """``PerToken``: every leading axis indexes tokens; other granularities: none."""
  return max(ndim - 1, 0) if isinstance(granularity, PerToken) else 0


def block_layout(
  shape: tuple[int, ...], granularity: Granularity, *, token_axes: int | None = 0, pad: bool = False
) -> BlockLayout:
  """The :class:`BlockLayout` of ``granularity`` over ``shape``.

  Args:
    shape: the input's shape.
    granularity: a :class:`Granularity`.
    token_axes: how many leading axes index tokens (their statistics are reduced into the state);
      None takes :func:`default_token_axes`.
    pad: give an axis the block does not divide a partial last block instead of raising.

  Raises:
    ValueError: a block does not divide its axis (and ``pad`` is False), ``token_axes`` exceeds the
      rank, or a ``PerAxis`` axis is a token axis.

  Examples:
    >>> import jax_observers as jo
    >>> jo.block_layout((3, 4, 256), jo.PerGroup(128), token_axes=1).state_shape
    (4, 2)
    >>> jo.block_layout((4, 200), jo.PerGroup(128), pad=True).state_shape
    (4, 2)
  """
  shape = tuple(int(n) for n in shape)
  block = get_block_size(shape, granularity)
  if token_axes is None:
    token_axes = default_token_axes(granularity, len(shape))
  if isinstance(token_axes, bool) or not isinstance(token_axes, int) or token_axes < 0:
    raise ValueError(f"token_axes={token_axes!r} must be None or an int >= 0.")
  if token_axes > len(shape):
    raise ValueError(f"token_axes={token_axes} exceeds the rank of an input of shape {shape}.")
  if isinstance(granularity, PerAxis) and granularity.axis % max(len(shape), 1) < token_axes:
    raise ValueError(
      f"{granularity} keeps axis {granularity.axis} of shape {shape}, but token_axes={token_axes} "
      "reduces it: use a feature axis, or token_axes=0."
    )
  pad_widths, view_shape, stat_axes = [], [], []
  for i, (n, b) in enumerate(zip(shape, block, strict=True)):
    if i < token_axes or (b == n and n != 1):  # a token axis or one whole block: reduce it all
      pad_widths.append(0)
      stat_axes.append(len(view_shape))
      view_shape.append(n)
    elif b == 1:  # every index its own block
      pad_widths.append(0)
      view_shape.append(n)
    else:  # split into (blocks, block)
      if n % b and not pad:
        raise ValueError(
          f"{granularity} needs axis {i} of shape {shape} (size {n}) to be a multiple of {b}; "
          "pass pad=True (pad_partial_blocks=True on observers) for a partial last block."
        )
      blocks = math.ceil(n / b)
      pad_widths.append(blocks * b - n)
      view_shape.extend((blocks, b))
      stat_axes.append(len(view_shape) - 1)
  return BlockLayout(shape, tuple(pad_widths), tuple(view_shape), tuple(stat_axes))
