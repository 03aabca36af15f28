import sys, time, functools
import hivemind, swarm.processes as P
def timed(owner, name):
    f = getattr(owner, name)
    @functools.wraps(f)
    def g(*a, **k):
        t = time.monotonic(); r = f(*a, **k); print(f"[{name} {time.monotonic()-t:.2f}s]", flush=True); return r
    setattr(owner, name, g)
timed(hivemind.DHT, "shutdown"); timed(P, "reap_children")
import swarm.apps.cli as cli
cli.reap_children = P.reap_children
import swarm.server.server as S
S.reap_children = P.reap_children
t0 = time.monotonic()
try:
    rc = cli.main(sys.argv[1:])
finally:
    print(f"[main returned {time.monotonic()-t0:.2f}]", flush=True)
    import atexit, gc, os, threading
    print(f"[{atexit._ncallbacks()} atexit callbacks; threads {[t.name for t in threading.enumerate()]}]", flush=True)
    t = time.monotonic(); atexit._run_exitfuncs(); print(f"[atexit {time.monotonic()-t:.2f}]", flush=True)
    t = time.monotonic(); gc.collect(); print(f"[gc {time.monotonic()-t:.2f}]", flush=True)
    if "EXIT" in os.environ:
        sys.stdout.flush(); os._exit(0)
