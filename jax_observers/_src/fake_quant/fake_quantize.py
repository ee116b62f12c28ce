r"""``FakeQuantize`` and ``FixedQParamsFakeQuantize``: an observer plus fake quantization, functionally.

The protocol (shared with :mod:`fused` and :mod:`learnable`), for a config ``fq``:

* ``state = fq.init(x)`` builds the buffers for inputs shaped like ``x``;
* ``y, state = fq.apply(state, x, axis_name=None)`` is torch's ``forward``: when
  ``state.observer_enabled``, the observer sees ``stop_gradient(x)`` first and ``scale``/``zero_point``
  become its qparams **including this batch**; then, when ``state.fake_quant_enabled``,
  :math:`y = \mathrm{fake\_quantize}(x; s, z)` with those stored qparams, else :math:`y = x`;
* ``state = fq.update(state, x, axis_name=None)`` is ``apply`` without ``y`` (the observer protocol);
* ``fq.calculate_qparams(state)`` is torch's ``calculate_qparams()``;
* ``jo.enable_observer(state)`` / ``jo.disable_fake_quant(tree)`` ... flip the flags, which live in the
  state (torch keeps them in buffers) so toggling never recompiles.

Under ``jax.jit`` the flags are traced. The output selects between the fake-quantized ``x`` and
``x``, both computed, so XLA fuses the fake quantization and its straight-through mask with their
neighbours; the observer runs under ``lax.cond`` (so a frozen one costs nothing), or, for inputs of
at most ``stats.SMALL`` elements, runs and is selected. Eagerly, a Python ``if`` picks.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_observers._src import base, serialization, stats
from jax_observers._src.base import (
  Observer,
  QParams,
  QScheme,
  UniformGrid,
  canonical_dtype,
)
from jax_observers._src.config import PartialConfig, float_input, normalized_axis
from jax_observers._src.fake_quant import layouts, ops
from jax_observers._src.fake_quant.state import FakeQuantizeState
from jax_observers._src.observers.fixed import FixedQParamsObserver
from jax_observers._src.observers.minmax import MovingAverageMinMaxObserver


def _observer_root(observer) -> type:
  if isinstance(observer, PartialConfig):
    return observer.root
  return type(observer) if isinstance(observer, Observer) else observer


def _observer_dtype(observer):
  """The dtype torch's range check reads: the observer's, else its partial's, else its default."""
  if isinstance(observer, Observer):
    return getattr(observer, "dtype", None)
  keywords = observer.resolved_keywords if isinstance(observer, PartialConfig) else {}
  if "dtype" in keywords:
    return keywords["dtype"]
  fields = {f.name: f for f in dataclasses.fields(_observer_root(observer))}
  return fields["dtype"].default if "dtype" in fields else None


def build_observer(observer, quant_min, quant_max, *, strict_order: bool, **extra) -> Observer:
  """torch's ``observer(**observer_kwargs)`` with ``quant_min``/``quant_max`` passed when both are set.

  ``observer`` is an Observer class, a ``with_args`` partial or an Observer instance (then
  ``replace``-d). ``strict_order`` requires ``quant_min < quant_max`` (torch's learnable fake quant).
  """
  root = _observer_root(observer)
  if not (isinstance(root, type) and issubclass(root, Observer)) or issubclass(
    root, FakeQuantizeBase
  ):
    raise TypeError(f"observer={observer!r} must be an Observer class, partial or instance.")
  names = {f.name for f in dataclasses.fields(root) if f.init}
  kwargs = {k: v for k, v in extra.items() if k in names}
  if quant_min is not None and quant_max is not None:
    if quant_min > quant_max or (strict_order and quant_min == quant_max):
      relation = "less than" if strict_order else "less than or equal to"
      raise ValueError(f"quant_min={quant_min} must be {relation} quant_max={quant_max}.")
    dtype = canonical_dtype(_observer_dtype(observer))
    try:
      info = jnp.iinfo(dtype)
    except ValueError:
      raise TypeError(f"quant_min/quant_max need an integer observer dtype; got {dtype}.") from None
    if quant_min < info.min or quant_max > info.max:
      raise ValueError(
        f"[quant_min, quant_max] = [{quant_min}, {quant_max}] is out of bounds for dtype {dtype}."
      )
    kwargs.update(quant_min=quant_min, quant_max=quant_max)
  if isinstance(observer, Observer):
    return observer.replace(**kwargs)
  return observer(**kwargs)


def branch(flag, if_true, if_false, operand):
  """``lax.cond`` on a traced flag; a plain Python branch on a concrete one (fast eager calls)."""
  if isinstance(flag, jax.core.Tracer):
    return lax.cond(flag, if_true, if_false, operand)
  return if_true(operand) if bool(flag) else if_false(operand)


def select(flag, if_true, if_false):
  """``if_true`` where ``flag`` is set, else ``if_false``: computed pytrees of one structure."""
  return jax.tree_util.tree_map(lambda a, b: jnp.where(flag, a, b), if_true, if_false)


def _same_types(new, old):
  """``new`` with ``old``'s leaf dtypes (both ``lax.cond`` branches must agree exactly)."""
  return jax.tree_util.tree_map(
    lambda n, o: lax.convert_element_type(n, jnp.result_type(o)), new, old
  )


class FakeQuantizeBase(Observer):
  """Fake quantization satisfies the observer protocol (``init``, ``update``, ``calculate_qparams``)
  and adds ``apply``: the fake-quantized input with the new state (module docstring).

  ``trainable_fields`` names the state fields that are trainable parameters (LSQ's scale and zero
  point): Flax keeps them in 'params' / nnx.Param and writes them into the state before each apply.
  """

  @abc.abstractmethod
  def apply(self, state, x, *, axis_name=None) -> tuple[jax.Array, Any]:
    """``(y, new_state)``: torch's ``forward``."""

  def update(self, state, x, *, axis_name=None):
    """The state after ``apply`` (observing, with the current flags); ``y`` is dropped."""
    return self.apply(state, x, axis_name=axis_name)[1]

  @abc.abstractmethod
  def calculate_qparams(self, state) -> QParams:
    """torch's ``calculate_qparams()``."""

  def check_state(self, state, method: str) -> None:
    """At trace time, a ValueError unless ``state`` is this config's kind of state."""
    shapes = [(None,)] if self.qscheme.is_per_channel else [()]
    fields = {"scale": (shapes, jnp.float32), "zero_point": (shapes, self.zero_point_dtype())}
    base.check_state(self, state, self.state_kind, method, fields)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FakeQuantize(FakeQuantizeBase):
  r"""torch's ``FakeQuantize``: observe, take the qparams, fake-quantize with them.

  .. math::
     (s, z) \leftarrow \mathrm{qparams}(\mathrm{observe}(x)), \qquad
     y = (\mathrm{clip}(z + \mathrm{rne}(x \cdot \tfrac1s), q_{min}, q_{max}) - z)\, s

  Args:
    observer: an Observer class, ``with_args`` partial or instance (torch's ``observer`` plus its
      ``**observer_kwargs``: pass them with ``Observer.with_args(...)``).
    quant_min, quant_max: when both are set they are checked against the observer dtype and passed to
      the observer, which then has a custom range (a symmetric quint8 zero point is 127, E26).
    is_dynamic: passed to the observer, as torch does.

  Examples:
    >>> import jax, jax.numpy as jnp, jax_observers as jo
    >>> fq = jo.FakeQuantize(observer=jo.MovingAverageMinMaxObserver, quant_min=0, quant_max=255)
    >>> x = jnp.array([-1.0, 0.3, 2.0])
    >>> y, state = jax.jit(fq.apply)(fq.init(x), x)
    >>> [round(v, 4) for v in y.tolist()], int(state.zero_point)
    ([-1.0, 0.3059, 2.0], 85)
  """

  observer: Any = dataclasses.field(default=MovingAverageMinMaxObserver, compare=False)
  quant_min: int | None = None
  quant_max: int | None = None
  is_dynamic: bool = False
  activation_post_process: Observer = dataclasses.field(init=False)

  torch_flag_dtype = np.uint8  # dtype of torch's enabled-flag buffers (the fused module: int64)
  state_kind = FakeQuantizeState

  def __post_init__(self):
    base.python_scalars(self)
    obs = build_observer(
      self.observer, self.quant_min, self.quant_max, strict_order=False, is_dynamic=self.is_dynamic
    )
    if not isinstance(obs, UniformGrid):
      raise TypeError(
        f"{type(self).__name__} needs an observer on a uniform integer grid (a jo.UniformGrid: "
        f"a qscheme and a quantized range); got {type(obs).__name__}."
      )
    object.__setattr__(self, "activation_post_process", obs)

  @property
  def qscheme(self) -> QScheme:
    return self.activation_post_process.qscheme

  @property
  def is_per_channel(self) -> bool:
    return self.qscheme.is_per_channel

  @property
  def quant_range(self) -> tuple[int, int]:
    """The observer's final ``(quant_min, quant_max)``, which the fake quantization uses."""
    return self.activation_post_process.quant_range

  @property
  def ch_axis(self) -> int:
    """The observer's channel axis, or -1 per tensor (torch's attribute)."""
    axis = self.activation_post_process.grid_axis
    return -1 if axis is None else axis

  def qparams_shape(self, x) -> tuple[int, ...]:
    if not self.is_per_channel:
      return ()
    shape = jnp.shape(x)
    return (shape[normalized_axis(self.ch_axis, shape)],)

  def zero_point_dtype(self):
    float_qparams = self.activation_post_process.qscheme == QScheme.PER_CHANNEL_AFFINE_FLOAT_QPARAMS
    return jnp.float32 if float_qparams else jnp.int32

  def init(self, x) -> FakeQuantizeState:
    x = float_input(x, self)
    shape = self.qparams_shape(x)
    return FakeQuantizeState(
      fake_quant_enabled=jnp.ones((), jnp.bool_),
      observer_enabled=jnp.ones((), jnp.bool_),
      scale=jnp.ones(shape, jnp.float32),
      zero_point=jnp.zeros(shape, self.zero_point_dtype()),
      activation_post_process=self.activation_post_process.init(x),
    )

  def observe(self, state, x, axis_name):
    """The state after the observer saw ``x``, with ``scale``/``zero_point`` from its qparams."""
    obs = self.activation_post_process
    obs_state = obs.update(state.activation_post_process, lax.stop_gradient(x), axis_name=axis_name)
    scale, zero_point = obs.calculate_qparams(obs_state)
    return state.replace(
      activation_post_process=_same_types(obs_state, state.activation_post_process),
      scale=jnp.asarray(scale, jnp.float32).reshape(state.scale.shape),
      zero_point=jnp.asarray(zero_point).astype(state.zero_point.dtype).reshape(state.scale.shape),
    )

  def fake_quant(self, x, scale, zero_point) -> jax.Array:
    """``x`` fake-quantized with the given qparams and the observer's range (torch's forward)."""
    return self.fake_quantize(x, QParams(scale=scale, zero_point=zero_point))

  def fake_quantize(self, x, qparams: QParams) -> jax.Array:
    """``x`` quantized and dequantized with ``qparams`` on the observer's grid."""
    return self.activation_post_process.fake_quantize(x, qparams)

  def apply(self, state: FakeQuantizeState, x, *, axis_name=None):
    """``(y, new_state)``: observe first when enabled, then fake-quantize with the stored qparams."""
    x = float_input(x, self)
    self.check_state(state, "apply")
    flag = state.observer_enabled
    if isinstance(flag, jax.core.Tracer) and x.size <= stats.SMALL:
      # Observing a small input costs less than a lax.cond around it (a fusion barrier and a kernel
      # boundary on the step's critical path): observe, then select.
      state = select(flag, self.observe(state, x, axis_name), state)
    else:
      state = branch(flag, lambda s: self.observe(s, x, axis_name), lambda s: s, state)
    return self.output(state, x), state

  def output(self, state: FakeQuantizeState, x) -> jax.Array:
    """``x`` fake-quantized with the stored qparams when ``state.fake_quant_enabled``, else ``x``."""
    flag = state.fake_quant_enabled
    if isinstance(flag, jax.core.Tracer):  # a select XLA fuses; a lax.cond splits both passes
      obs = self.activation_post_process
      return ops.fake_quantize_where(
        flag, x, state.scale, state.zero_point, obs.grid_axis, *obs.quant_range
      )
    return branch(
      state.fake_quant_enabled,
      lambda a: self.fake_quant(*a),
      lambda a: a[0],
      (x, state.scale, state.zero_point),
    )

  def calculate_qparams(self, state: FakeQuantizeState) -> QParams:
    """The observer's qparams from its current statistics (torch: not the stored buffers)."""
    self.check_state(state, "calculate_qparams")
    return self.activation_post_process.calculate_qparams(state.activation_post_process)

  def unobserved(self, state: FakeQuantizeState) -> jax.Array | None:
    return self.activation_post_process.unobserved(state.activation_post_process)

  def degenerate(self, state: FakeQuantizeState) -> jax.Array | None:
    return self.activation_post_process.degenerate(state.activation_post_process)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedQParamsFakeQuantize(FakeQuantize):
  """torch's ``FixedQParamsFakeQuantize``: fake quantization with a ``FixedQParamsObserver``'s qparams.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> fq = jo.default_fixed_qparams_range_neg1to1_fake_quant()
    >>> x = jnp.array([-1.0, 0.0, 0.99, 1.0])
    >>> fq.apply(fq.init(x), x)[0].tolist()
    [-1.0, 0.0, 0.9921875, 0.9921875]
  """

  observer: Any = dataclasses.field(compare=False)
  quant_min: int | None = dataclasses.field(default=None, init=False)
  quant_max: int | None = dataclasses.field(default=None, init=False)
  is_dynamic: bool = dataclasses.field(default=False, init=False)

  def __post_init__(self):
    super().__post_init__()
    obs = self.activation_post_process
    if type(obs) is not FixedQParamsObserver:
      raise TypeError(
        f"FixedQParamsFakeQuantize's observer must be a FixedQParamsObserver; got {type(obs).__name__}."
      )
    if obs.qscheme.is_per_channel:
      raise ValueError(
        f"FixedQParamsFakeQuantize is per tensor only; got qscheme={obs.qscheme.value}."
      )

  def init(self, x=None) -> FakeQuantizeState:
    obs = self.activation_post_process
    return FakeQuantizeState(
      fake_quant_enabled=jnp.ones((), jnp.bool_),
      observer_enabled=jnp.ones((), jnp.bool_),
      scale=jnp.asarray(obs.scale, jnp.float32),
      zero_point=jnp.asarray(obs.zero_point, jnp.int32),
      activation_post_process=obs.init(x),
    )

  def calculate_qparams(self, state: FakeQuantizeState) -> QParams:
    """The fixed ``(scale, zero_point)`` (torch returns its shared buffers)."""
    self.check_state(state, "calculate_qparams")
    return QParams(scale=state.scale, zero_point=state.zero_point)


serialization.register(
  FakeQuantize,
  layouts.fake_quantize_to_dict,
  layouts.fake_quantize_from_dict,
)
