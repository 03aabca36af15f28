import time, tempfile, subprocess, sys, signal, threading
from shards.testing import save_random_checkpoint
from swarm.apps.local_swarm import LocalSwarm
path = save_random_checkpoint(tempfile.mkdtemp(), "llama", max_shard_size="40KB")
with LocalSwarm(path) as swarm:
    p = subprocess.Popen([sys.executable, "-m", "swarm.apps.cli", "serve", path, "--initial-peers", *swarm.initial_peers,
                          "--blocks", "0:2", "--host", "127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = None
    for line in p.stdout:
        now = time.monotonic()
        print(f"{(now - t0) if t0 else 0:6.2f} {line.rstrip()[:150]}", flush=True)
        if "NEVER" in line:
            time.sleep(0.4); import os
            print(subprocess.run([os.path.join(os.path.dirname(sys.executable), "py-spy"), "dump", "--pid", str(p.pid)], capture_output=True, text=True).stdout)
        if "Server ready" in line:
            t0 = time.monotonic(); p.send_signal(signal.SIGTERM)
    p.wait(); print(f"exit {time.monotonic()-t0:.2f}")
