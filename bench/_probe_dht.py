import time
from swarm.dht.records import make_dht
from swarm.processes import reap_children
dht = make_dht([], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
dht2 = make_dht([str(m) for m in dht.get_visible_maddrs()], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
t = time.monotonic(); dht2.shutdown(); t1 = time.monotonic()
reap_children(grace=2.0); t2 = time.monotonic()
print(f"dht.shutdown {t1-t:.2f}s reap {t2-t1:.2f}s")
dht.shutdown()
