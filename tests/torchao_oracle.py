"""torchao's affine and float8 formulas as torch ops: the oracle where torch 2.13 lacks torchao.

torch 2.13 ships torchao's granularity classes, ``MappingType``, ``ZeroPointDomain``,
``get_block_size`` and the abstract ``AffineQuantizedObserverBase``, but not
``AffineQuantizedMinMaxObserver`` nor ``choose_qparams_affine`` (they live in torchao, which cannot
be installed here). This module re-states torchao's published algorithms (``quant_primitives.py``,
``pt2e/_affine_quantization.py``, ``observer.py``) with torch's own float32 ops, in torchao's order,
and builds the twin observers on torch's live base class. Written for these tests; torchao's code is
not copied.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax_observers as jo

torch = pytest.importorskip("torch")
from torch.ao.quantization import observer as tobs  # noqa: E402


def torch_granularity(g):
  """torch 2.13's granularity object for ours, or None where torch 2.13 has no equivalent."""
  if isinstance(g, jo.PerTensor):
    return tobs.PerTensor()
  if isinstance(g, jo.PerAxis):
    return tobs.PerAxis(g.axis)
  if isinstance(g, jo.PerGroup):
    return tobs.PerGroup(g.group_size)
  if isinstance(g, jo.PerRow):
    return tobs.PerRow() if g.dim == -1 else None
  if isinstance(g, jo.PerToken):
    return tobs.PerToken()
  return None  # PerBlock: torch 2.13's get_block_size raises "Unsupported Granularity"


def block_size(shape, g) -> tuple[int, ...]:
  """torch 2.13's live ``get_block_size`` where it applies; torchao's rule otherwise."""
  tg = torch_granularity(g)
  if tg is not None and not (isinstance(g, jo.PerGroup) and len(shape) != 2):
    return tuple(tobs.get_block_size(tuple(shape), tg))
  if isinstance(g, jo.PerBlock):  # torchao: left-pad the block with 1s to the input's rank
    return (1,) * (len(shape) - len(g.block_size)) + tuple(g.block_size)
  if isinstance(g, jo.PerGroup):  # our generalisation of torch's 2-D-only rule
    return (1,) * (len(shape) - 1) + (g.group_size,)
  if isinstance(g, jo.PerRow):  # torchao's PerRow(dim)
    out = [1] * len(shape)
    out[g.dim] = shape[g.dim]
    return tuple(out)
  raise AssertionError(g)


def reduction_params(block, shape):
  """torchao's ``_get_reduction_params``: the view shape and the dims one block reduces."""
  view, dims = [], []
  for n, b in zip(shape, block, strict=True):
    if b != n and b > 1:
      assert n % b == 0, (shape, block)
      view += [n // b, b]
      dims.append(len(view) - 1)
    else:
      if b != 1:
        dims.append(len(view))
      view.append(n)
  return view, dims


def all_ones_block(block, shape) -> bool:
  """torchao reduces nothing here, and ``torch.amin(v, dim=[])`` then reduces *every* dim."""
  return not reduction_params(block, shape)[1] and len(shape) > 0


def block_min_max(x: torch.Tensor, block, torchao_quirk=True):
  """Per-block min and max; ``torchao_quirk=False`` keeps one block per element where torchao's
  empty reduction list collapses the whole tensor (our documented deviation)."""
  view, dims = reduction_params(block, tuple(x.shape))
  v = x.reshape(view)
  if not dims and not torchao_quirk:
    return v.clone(), v.clone()
  return torch.amin(v, dim=dims), torch.amax(v, dim=dims)


def qparams_with_min_max(mn, mx, mapping, qmin, qmax, eps, preserve_zero=True, domain="INT"):
  """torchao's ``choose_qparams_affine_with_min_max`` (main), float32 torch ops in its order."""
  if preserve_zero:
    min_neg = torch.min(mn, torch.zeros_like(mn))
    max_pos = torch.max(mx, torch.zeros_like(mx))
  else:
    min_neg, max_pos = mn, mx
  if mapping in ("SYMMETRIC", "SYMMETRIC_NO_CLIPPING_ERR"):
    if mapping == "SYMMETRIC":
      scale = torch.max(-min_neg, max_pos) / (float(qmax - qmin) / 2)
    else:
      smin, smax = min_neg / float(qmin), max_pos / float(qmax)
      scale = torch.where(smin > smax, smin, smax)
    zp = None if domain == "NONE" else torch.full_like(scale, int((qmax + qmin + 1) / 2))
    scale = torch.clamp(scale, min=eps)
    return scale, zp
  scale = (max_pos - min_neg) / torch.tensor(float(qmax - qmin), dtype=torch.float32)
  scale = torch.clamp(scale, min=eps)
  if domain == "NONE":
    return scale, None
  if domain == "INT":
    zp = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax)
    return scale, zp.to(torch.int32)
  return scale, min_neg + scale * ((qmax + qmin + 1) / 2)


def _after(view, dims, scale):
  if not dims and scale.numel() == 1:  # torchao's collapsed all-ones block: one scale
    return [1] * len(view)
  return [1 if i in dims else n for i, n in enumerate(view)]


def quantize(x, block, scale, zp, qmin, qmax, domain="INT"):
  """torchao's ``_quantize_affine_no_dtype_cast`` (values still float)."""
  view, dims = reduction_params(block, tuple(x.shape))
  after = _after(view, dims, scale)
  v, s = x.reshape(view), scale.reshape(after)
  if domain == "INT":
    q = torch.round(v * (1.0 / s)) + zp.reshape(after)
  elif domain == "NONE":
    q = torch.round(v * (1.0 / s))
  else:
    low = zp.reshape(after) - s * ((qmax + qmin + 1) / 2)
    q = torch.round((v - low) / s)
  return torch.clamp(q, qmin, qmax).reshape(x.shape)


def dequantize(q, block, scale, zp, qmin, qmax, domain="INT"):
  """torchao's ``_dequantize_affine_no_dtype_check``."""
  view, dims = reduction_params(block, tuple(q.shape))
  after = _after(view, dims, scale)
  v, s = q.reshape(view), scale.reshape(after)
  if domain == "INT":
    out = (v.to(torch.int32) - zp.reshape(after).to(torch.int32)).to(torch.float32) * s
  elif domain == "NONE":
    out = v.to(torch.float32) * s
  else:
    out = (v - (qmax + qmin + 1) / 2).to(torch.float32)
    out = out * s
    out = out + zp.reshape(after)
  return out.reshape(q.shape)


class TorchaoMinMaxObserver(tobs.AffineQuantizedObserverBase):
  """torchao's ``AffineQuantizedMinMaxObserver`` (and, with ``averaging_constant``, the pt2e
  moving-average one) on torch 2.13's live ``AffineQuantizedObserverBase``."""

  def __init__(self, obs, averaging_constant=None, torchao_quirk=True):
    super().__init__(
      getattr(tobs.MappingType, obs.mapping_type.name),
      torch.int8,  # unused by the formulas: the range comes from our config
      torch_granularity(obs.granularity) or tobs.PerTensor(),
      quant_min=obs.quant_range[0],
      quant_max=obs.quant_range[1],
      eps=obs.eps,
      preserve_zero=obs.preserve_zero,
      zero_point_domain=getattr(tobs.ZeroPointDomain, obs.zero_point_domain.name),
    )
    self.ours = obs
    self.averaging_constant = averaging_constant
    self.torchao_quirk = torchao_quirk

  def forward(self, x):
    if x.numel() == 0:
      return x
    self.block_size = block_size(tuple(x.shape), self.ours.granularity)
    mn, mx = block_min_max(x.detach(), self.block_size, self.torchao_quirk)
    if not hasattr(self, "min_val"):
      self.min_val, self.max_val = mn, mx
    elif self.averaging_constant is None:
      self.min_val, self.max_val = torch.min(self.min_val, mn), torch.max(self.max_val, mx)
    else:
      c = self.averaging_constant
      self.min_val = self.min_val + c * (mn - self.min_val)
      self.max_val = self.max_val + c * (mx - self.max_val)
    return x

  def calculate_qparams(self):
    qmin, qmax = self.ours.quant_range
    eps = float(np.finfo(np.float32).eps) if self.eps is None else self.eps
    return qparams_with_min_max(
      self.min_val,
      self.max_val,
      self.mapping_type.name,
      qmin,
      qmax,
      eps,
      self.preserve_zero,
      self.zero_point_domain.name,
    )


def float8_block_amax(x: torch.Tensor, block, torchao_quirk=True):
  """torchao's per-block ``max(|x|)`` for ``_choose_scale_float8`` (quirk: see block_min_max)."""
  view, dims = reduction_params(block, tuple(x.shape))
  v = torch.abs(x.reshape(view))
  return v if not dims and not torchao_quirk else torch.amax(v, dim=dims)


def float8_scale(amax, fp8_dtype, hp_value_lb=None, hp_value_ub=None):
  """torchao's ``_choose_scale_float8`` from block amaxes."""
  if hp_value_lb is not None or hp_value_ub is not None:
    amax = torch.clamp(amax, min=hp_value_lb, max=hp_value_ub)
  return amax / torch.finfo(fp8_dtype).max
