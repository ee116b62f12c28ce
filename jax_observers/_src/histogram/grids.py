r"""The histogram range policies as objects: the grid a state's counts are on, and how it moves.

A policy says everything that depends on it, so call sites ask the object instead of comparing
``range_policy`` strings:

* :data:`TORCH` (``range_policy='torch'``): torch's evenly spaced bins on the running range
  :math:`[m, M]` (or :math:`[-a, a]`, :math:`[0, a]` by ``mode``), float32 counts, re-binned by
  torch's ``_upscale_histogram`` when the range grows: bit for bit with torch.
* :data:`POW2` (``range_policy='pow2'``): the power-of-two grid of :mod:`pow2_grid`, int32 counts,
  exact bin merging: the state depends only on the multiset of values observed.

:func:`policy` maps the config's ``range_policy`` string to its object (a ValueError naming it
otherwise); configs keep the string, torch-style, and hold no object.
"""

from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_observers._src.histogram import arithmetic, pow2_grid

MODES = ("signed", "symmetric", "absolute")
_REBIN_BATCH = 4  # channels re-binned at once: ~1.2 MiB of temporaries each, allocated every call


def mode_range(min_val, max_val, mode: str):
  """The interval histogrammed for the running range ``[min_val, max_val]`` under ``mode``."""
  if mode == "signed":
    return min_val, max_val
  amax = jnp.maximum(-min_val, max_val)
  return (jnp.zeros_like(amax) if mode == "absolute" else -amax), amax


class Grid(abc.ABC):
  """A range policy: its count dtype, its grid parameters, bins, edges and merge rule."""

  name: str
  count_dtype: jnp.dtype

  def check_bins(self, bins: int) -> None:
    """A ValueError when the policy cannot use ``bins`` bins (any positive count, by default)."""
    del bins

  @abc.abstractmethod
  def params(self, min_val, max_val, bins: int, mode: str) -> tuple[jax.Array, jax.Array]:
    """The grid of a running range: the two arrays :meth:`positions` and :meth:`merge` take."""

  @abc.abstractmethod
  def positions(self, values, keep, a, b, bins: int) -> jax.Array:
    """int32 bin of each value on the grid ``(a, b)``; ``bins`` for a value not counted."""

  @abc.abstractmethod
  def merge(self, hist, counts, fresh, seen, a_old, b_old, a, b, *, upsample_rate: int):
    """The histogram carried from grid ``(a_old, b_old)`` onto ``(a, b)``, plus int32 ``counts``."""

  @abc.abstractmethod
  def edges(self, min_val, max_val, bins: int, mode: str) -> tuple[jax.Array, jax.Array]:
    """The first and last bin edges of the grid of ``[min_val, max_val]``."""

  @abc.abstractmethod
  def bin_edges(self, min_val, max_val, bins: int, mode: str) -> jax.Array:
    """All ``bins + 1`` edges (``[..., bins + 1]`` float32)."""

  def search_domain(self, min_val, max_val, bins: int):
    """The range torch's L2 search walks the bins over: the running range itself."""
    return min_val, max_val

  def search_bounds(self, new_min, new_max, min_val, max_val):
    """The searched clipping range, kept inside what was observed where the grid is wider."""
    return new_min, new_max

  def check_loaded(self, refuse, hist, lo, hi, mode: str) -> None:
    """Loader check that the counts can be this grid's for ``[lo, hi]``; ``refuse(reason)`` if not."""
    del refuse, hist, lo, hi, mode  # any float32 counts can be torch's


class TorchGrid(Grid):
  name = "torch"
  count_dtype = jnp.dtype(jnp.float32)

  def params(self, min_val, max_val, bins, mode):
    return mode_range(min_val, max_val, mode)

  def positions(self, values, keep, a, b, bins):
    return arithmetic.histc_positions(values, keep, bins, a, b)

  def merge(self, hist, counts, fresh, seen, a_old, b_old, a, b, *, upsample_rate):
    """torch's ``forward``: the old histogram carried onto the new range, plus the counts."""
    carry = lambda ops: arithmetic.rebinned(*ops, upsample_rate=upsample_rate)
    operands = (hist, a_old, b_old, a, b)
    if hist.ndim == 1:
      base = carry(operands)
    else:  # a few channels at a time: each makes [bins * upsample_rate] temporaries.
      rebin = lambda: lax.map(carry, operands, batch_size=_REBIN_BATCH)
      base = _if_moved(fresh, (a_old, b_old), (a, b), rebin, hist)
    new = jnp.where(fresh[..., None], 0.0, base) + counts.astype(jnp.float32)
    return jnp.where(seen[..., None], new, hist)

  def edges(self, min_val, max_val, bins, mode):
    return arithmetic.histc_edges(*mode_range(min_val, max_val, mode))

  def bin_edges(self, min_val, max_val, bins, mode):
    lo, hi = self.edges(min_val, max_val, bins, mode)
    space = lambda a, b: arithmetic.linspace(a, b, bins + 1)
    return jax.vmap(space)(lo, hi) if lo.ndim else space(lo, hi)


class Pow2Grid(Grid):
  name = "pow2"
  count_dtype = jnp.dtype(jnp.int32)

  def check_bins(self, bins):
    pow2_grid.check_bins(bins)

  def params(self, min_val, max_val, bins, mode):
    return pow2_grid.grid(min_val, max_val, bins, mode)

  def positions(self, values, keep, a, b, bins):
    return pow2_grid.positions(values, keep, a, b, bins)

  def merge(self, hist, counts, fresh, seen, a_old, b_old, a, b, *, upsample_rate):
    """Exact bin merging onto the new grid, then a saturating add of the counts."""
    a_new = jnp.where(fresh, a_old, a)
    regrid = lambda: pow2_grid.regrid(hist, a_old, b_old, a_new, b)
    old = _if_moved(fresh, (a_old, b_old), (a_new, b), regrid, hist)
    new = pow2_grid.saturating_add(jnp.where(fresh[..., None], 0, old), counts)
    return jnp.where(seen[..., None], new, hist)

  def edges(self, min_val, max_val, bins, mode):
    return pow2_grid.edges(*pow2_grid.grid(min_val, max_val, bins, mode), bins)

  def bin_edges(self, min_val, max_val, bins, mode):
    g, o = pow2_grid.grid(min_val, max_val, bins, mode)
    lo, hi = pow2_grid.edges(g, o, bins)
    width = (hi - lo) / np.float32(bins)  # a power of two: exact
    steps = jnp.arange(bins + 1, dtype=jnp.int32).reshape((1,) * o.ndim + (-1,)) - o[..., None]
    return steps.astype(jnp.float32) * width[..., None]

  def search_domain(self, min_val, max_val, bins):
    """The grid's own edges, which are wider than the running range."""
    return self.edges(min_val, max_val, bins, "signed")

  def search_bounds(self, new_min, new_max, min_val, max_val):
    return jnp.maximum(new_min, min_val), jnp.minimum(new_max, max_val)

  def check_loaded(self, refuse, hist, lo, hi, mode):
    """Refuses counts outside the bins ``[lo, hi]`` covers on the power-of-two grid."""
    bins = hist.shape[-1]
    g, o = pow2_grid.grid(jnp.asarray(lo), jnp.asarray(hi), bins, mode)
    seen = jnp.asarray(lo <= hi)
    if mode == "absolute":
      first = jnp.zeros(g.shape, jnp.int32)
      last = pow2_grid.positions(jnp.maximum(-lo, hi), seen, g, o, bins)
    else:
      first = pow2_grid.positions(jnp.asarray(lo), seen, g, o, bins)
      last = pow2_grid.positions(jnp.asarray(hi), seen, g, o, bins)
    j = np.arange(bins)
    outside = (j < np.asarray(first)[..., None]) | (j > np.asarray(last)[..., None])
    if np.any(outside & (hist != 0)):
      refuse(
        "counts outside the power-of-two grid bins of [min_val, max_val]: not a "
        "range_policy='pow2' histogram of this range"
      )


TORCH = TorchGrid()
POW2 = Pow2Grid()
GRIDS = {grid.name: grid for grid in (TORCH, POW2)}
RANGE_POLICIES = tuple(GRIDS)


def policy(range_policy) -> Grid:
  """The grid object of a ``range_policy`` string, or a ValueError naming it."""
  if not isinstance(range_policy, str) or range_policy not in GRIDS:
    raise ValueError(f"range_policy={range_policy!r}; expected one of {RANGE_POLICIES}.")
  return GRIDS[range_policy]


def of_counts(dtype) -> Grid | None:
  """The policy whose counts have ``dtype`` (a state says which grid it is on), else None."""
  return next((g for g in GRIDS.values() if g.count_dtype == jnp.dtype(dtype)), None)


def _if_moved(fresh, old_grid, new_grid, rebin, hist):
  """``rebin()`` if some channel seen before changes grid, else ``hist`` (the common case)."""
  moved = jnp.any(~fresh & ((old_grid[0] != new_grid[0]) | (old_grid[1] != new_grid[1])))
  return lax.cond(moved, rebin, lambda: hist)


class OnGrid:
  """Mixed into the histogram configs: ``grid``, the object of their ``range_policy`` string,
  and the bin ``edges`` of their states (``mode``: what the histogram holds)."""

  @property
  def grid(self) -> Grid:
    return policy(self.range_policy)

  def edges(self, state) -> jax.Array:
    """Bin edges of ``state.histogram``: ``[bins + 1]`` or ``[C, bins + 1]``."""
    return self.grid.bin_edges(state.min_val, state.max_val, self.bins, self.mode)
