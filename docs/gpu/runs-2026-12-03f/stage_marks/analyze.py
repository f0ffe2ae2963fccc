"""Median of each stage mark, ms after the client sent the request: python analyze.py STAGES CLIENT."""
import json, statistics, collections
import sys
client = json.load(open(sys.argv[2]))
events = []
for line in open(sys.argv[1]):
    parts = line.split()
    events.append((float(parts[-1]), int(parts[0]), parts[1]))
events.sort()
pids = {}
res = collections.defaultdict(lambda: collections.defaultdict(list))
for path, t0, first, last in client[10:]:
    evs = [(t, pid, lab) for t, pid, lab in events if t0 <= t <= last + 0.0005]
    seen = {}
    for t, pid, lab in evs:
        if lab not in seen:
            seen[lab] = (t - t0) * 1e3
    # first send_out = first response sent
    for lab, v in seen.items():
        res[path][lab].append(v)
    res[path]["client_first"].append((first - t0) * 1e3)
for path, labs in res.items():
    print(path)
    for lab, vs in sorted(labs.items(), key=lambda kv: statistics.median(kv[1])):
        print(f"   {lab:14s} {statistics.median(vs):7.3f}  n={len(vs)}")
