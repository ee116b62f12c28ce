"""States and QParams can cross ``jax.export``: each registers its pytree for serialization.

A function exported with ``jax.export`` that takes or returns observer states must name their
pytree types in the serialized artifact. States are ``flax.struct.PyTreeNode`` classes whose static
(non-array) fields, when a state has any, are plain Python values: they are serialized as JSON.

Examples:
  >>> import jax, jax.numpy as jnp, jax_observers as jo
  >>> obs = jo.MinMaxObserver()
  >>> x = jnp.arange(4.0)
  >>> exported = jax.export.export(jax.jit(obs.update))(obs.init(x), x)
  >>> restored = jax.export.deserialize(exported.serialize())
  >>> float(restored.call(obs.init(x), x).max_val)
  3.0
"""

from __future__ import annotations

import json

import jax


def _serialize_aux(aux) -> bytes:
  try:
    return json.dumps(list(aux)).encode()
  except TypeError as e:
    raise TypeError(f"this state's static fields {aux!r} are not JSON values: {e}") from None


def _deserialize_aux(data: bytes):
  return tuple(json.loads(data.decode()))


def register(*classes: type) -> None:
  """Registers each pytree class under ``jax_observers.<ClassName>`` for ``jax.export``."""
  for cls in classes:
    jax.export.register_pytree_node_serialization(
      cls,
      serialized_name=f"jax_observers.{cls.__name__}",
      serialize_auxdata=_serialize_aux,
      deserialize_auxdata=_deserialize_aux,
    )
