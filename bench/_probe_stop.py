import subprocess, sys, time, signal, psutil, os
for args in (["dht", "--host", "127.0.0.1", "--port", "0"], ["dht", "--host", "127.0.0.1", "--port", "0", "--no-relay"]):
    p = subprocess.Popen([sys.executable, "-m", "swarm.apps.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t0 = time.monotonic()
    line = p.stdout.readline()
    time.sleep(2); t1 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    p.wait()
    t2 = time.monotonic()
    while any(os.getsid(q.pid) == p.pid for q in psutil.process_iter() if q.is_running()):
        time.sleep(0.05)
    print(args[-1], f"ready {t1-t0:.2f}s, exit {t2-t1:.2f}s, all gone {time.monotonic()-t1:.2f}s rc={p.returncode}", line[:40])
