"""Live torchao 0.18 helpers kept for tests/fp8_test.py (the affine tests call torchao directly).

Block sizes, reduction parameters and the float8 scale are torchao's own functions
(``torchao.quantization.utils.get_block_size``, ``quant_primitives._get_reduction_params`` and
``_choose_scale_float8``); only the per-block ``max |x|`` is one torch expression, because torchao
fuses it into ``_choose_scale_float8`` and its all-ones block reduces the whole tensor.
"""

from __future__ import annotations

import pytest

import jax_observers as jo

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")
from torchao.quantization import granularity as tg  # noqa: E402
from torchao.quantization import quant_primitives as tq  # noqa: E402
from torchao.quantization.utils import get_block_size  # noqa: E402


def torchao_granularity(g):
  """torchao's granularity object for jo's."""
  if isinstance(g, jo.PerTensor):
    return tg.PerTensor()
  if isinstance(g, jo.PerAxis):
    return tg.PerAxis(g.axis)
  if isinstance(g, jo.PerGroup):
    return tg.PerGroup(g.group_size)
  if isinstance(g, jo.PerRow):
    return tg.PerRow(g.dim)
  if isinstance(g, jo.PerToken):
    return tg.PerToken()
  return tg.PerBlock(tuple(g.block_size))


def block_size(shape, g) -> tuple[int, ...]:
  """torchao's live ``get_block_size``."""
  return tuple(get_block_size(tuple(shape), torchao_granularity(g)))


def reduction_params(block, shape):
  """torchao's live ``_get_reduction_params``: the view shape and the dims one block reduces."""
  return tq._get_reduction_params(list(block), tuple(shape))


def float8_block_amax(x: torch.Tensor, block, torchao_quirk=True):
  """Per-block ``max(|x|)``; ``torchao_quirk=False`` keeps one block per element where torchao's
  empty reduction list collapses the whole tensor (jo's documented deviation)."""
  view, dims = reduction_params(block, tuple(x.shape))
  v = torch.abs(x.reshape(view))
  return v if not dims and not torchao_quirk else torch.amax(v, dim=dims)


def float8_scale(amax, fp8_dtype, hp_value_lb=None, hp_value_ub=None):
  """torchao's live ``_choose_scale_float8`` for block maxima ``amax`` (each block two copies)."""
  pair = torch.stack([amax, amax], -1)
  scale = tq._choose_scale_float8(
    pair, [1] * amax.ndim + [2], fp8_dtype, hp_value_lb=hp_value_lb, hp_value_ub=hp_value_ub
  )
  return scale.reshape(amax.shape)
