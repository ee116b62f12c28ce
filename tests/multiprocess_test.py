"""Calibration across 2 processes (jax.distributed on 127.0.0.1, gloo), 4 host devices each.

Every process must end with exactly the state of one observer that saw the whole global batch.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

WORKER = pathlib.Path(__file__).parent / "multiprocess_worker.py"
TIMEOUT_S = 240


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_end_with_the_global_batch_state():
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [
    subprocess.Popen(
      [sys.executable, str(WORKER), str(i), str(port)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    for i in range(2)
  ]
  outputs = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=TIMEOUT_S)
      assert proc.returncode == 0, err[-3000:]
      outputs.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for proc in procs:
      proc.kill()
  assert sorted(o["process"] for o in outputs) == [0, 1]
  for o in outputs:
    assert o["devices"] == 8
    assert o["equal"] == dict.fromkeys(o["equal"], True), o
    assert len(o["equal"]) == 5
