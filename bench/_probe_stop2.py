import time, signal, sys
sys.path.insert(0, ".")
from tests.test_processes import signalled_after
for delay in (0.05, 0.2, 0.6, 1.2, 2.5, 5.0):
    t = time.monotonic()
    left = signalled_after(["dht", "--host", "127.0.0.1", "--port", "0"], delay, signal.SIGTERM)
    print(delay, f"{time.monotonic() - t:.2f}s", left, flush=True)
