"""Wake-up latency on this host: socketpair ping-pong between processes and Condition hand-off between threads,
blocking waits vs spinning, and with a gap between messages (an idle core sleeps deeper)."""
import multiprocessing as mp, os, socket, statistics, sys, threading, time
from multiprocessing.connection import Connection

def echo(fd, spin):
    conn = Connection(fd)
    while True:
        if spin:
            while not conn.poll(0):
                pass
        else:
            conn.poll(1.0)
        msg = conn.recv()
        if msg is None:
            return
        conn.send(msg)

def pingpong(spin, gap, n=400):
    a, b = socket.socketpair()
    p = mp.Process(target=echo, args=(b.detach(), spin)); p.start()
    conn = Connection(a.detach())
    rtts = []
    for i in range(n):
        if gap:
            time.sleep(gap)
        t = time.perf_counter()
        conn.send(("tokens", i, [1, 2, 3]))
        if spin:
            while not conn.poll(0):
                pass
        conn.recv()
        rtts.append((time.perf_counter() - t) * 1e6)
    conn.send(None); p.join()
    return statistics.median(rtts[20:]) / 2

def handoff(spin, gap, n=400):
    cond = threading.Condition(); box = []; lat = []
    def waiter():
        while True:
            with cond:
                if spin:
                    cond.release()
                    while not box:
                        pass
                    cond.acquire()
                while not box:
                    cond.wait()
                t = box.pop()
            if t is None:
                return
            lat.append((time.perf_counter() - t) * 1e6)
    th = threading.Thread(target=waiter); th.start()
    for i in range(n):
        time.sleep(gap or 0.0005)
        with cond:
            box.append(time.perf_counter()); cond.notify()
    time.sleep(0.01)
    with cond:
        box.append(None); cond.notify()
    th.join()
    return statistics.median(lat[20:])

sys.setswitchinterval(0.0005)
for gap in (0.0, 0.002, 0.02):
    print(f"gap {gap*1e3:.0f} ms: pipe one-way blocking {pingpong(False, gap):.0f} us, spinning {pingpong(True, gap):.0f} us; "
          f"thread hand-off blocking {handoff(False, gap):.0f} us, spinning {handoff(True, gap):.0f} us", flush=True)

# Python work after an idle gap: sleeping (the core may drop to a deep idle state / low clock) vs spinning
import json
def work():
    s = 0
    for i in range(3000):
        s += i * i
    return json.dumps({"a": [s] * 50})
def timed(gap, spin):
    out = []
    for _ in range(200):
        if spin:
            end = time.perf_counter() + gap
            while time.perf_counter() < end:
                pass
        elif gap:
            time.sleep(gap)
        t = time.perf_counter(); work(); out.append((time.perf_counter() - t) * 1e6)
    return statistics.median(out[20:])
print(f"python work: back-to-back {timed(0, False):.0f} us, after 20 ms asleep {timed(0.02, False):.0f} us, "
      f"after 20 ms spinning {timed(0.02, True):.0f} us", flush=True)
