"""One process of tests/multiprocess_test.py: 4 host devices, calibrating over 8 global devices.

Run as ``python multiprocess_worker.py PROCESS_ID PORT``; prints one JSON line: for each observer,
whether this process's state equals one observer's state on the whole global batch.
"""

import functools
import json
import os
import sys

PROCESSES, LOCAL_DEVICES, ROWS, COLS = 2, 4, 64, 6


def main(process_id: int, port: int) -> None:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=PROCESSES,
    process_id=process_id,
    initialization_timeout=60,
  )
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  import jax_observers as jo

  assert jax.device_count() == PROCESSES * LOCAL_DEVICES
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rng = np.random.default_rng(0)  # every process draws the same global batches
  xs = [
    (rng.standard_normal((ROWS, COLS)) * (i + 1) + rng.uniform(-1, 1)).astype(np.float32)
    for i in range(3)
  ]
  rows = ROWS // PROCESSES
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  global_xs = [
    jax.make_array_from_process_local_data(
      sharding, x[process_id * rows : (process_id + 1) * rows], x.shape
    )
    for x in xs
  ]
  observers = {
    "minmax": jo.MinMaxObserver(),
    "moving_average": jo.MovingAverageMinMaxObserver(averaging_constant=0.3),
    "per_channel": jo.PerChannelMinMaxObserver(ch_axis=1, dtype=jnp.int8),
    "histogram": jo.HistogramObserver(bins=64),
    "mse_calibrator": jo.HistogramMSEObserver(bins=64),
  }
  result = {}
  for name, obs in observers.items():

    @jax.jit
    @functools.partial(
      jax.shard_map,
      mesh=mesh,
      in_specs=(PartitionSpec(), PartitionSpec("data")),
      out_specs=PartitionSpec(),
      check_vma=False,
    )
    def step(state, x, obs=obs):
      return obs.update(state, x, axis_name="data")

    state = obs.init(xs[0])
    single = obs.init(xs[0])
    for x, gx in zip(xs, global_xs, strict=True):
      state = step(state, gx)
      single = obs.update(single, x)
    local = [np.asarray(leaf.addressable_data(0)) for leaf in jax.tree.leaves(state)]
    result[name] = all(
      np.array_equal(a, np.asarray(b), equal_nan=True)
      for a, b in zip(local, jax.tree.leaves(single), strict=True)
    )
  print(json.dumps({"process": process_id, "devices": jax.device_count(), "equal": result}))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]))
