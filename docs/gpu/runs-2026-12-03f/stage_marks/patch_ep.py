"""Inserts stage marks into a rendered gpt_runtime/ (engine_process, scheduler, generation, gpt): run.py calls it."""
from pathlib import Path
import sys
HELPER = '''
import os as _os, time as _ptime
_PLOG = []
def _mark(label):
    _PLOG.append(f"{_os.getpid()} {label} {_ptime.perf_counter():.6f}")
    if len(_PLOG) >= 40:
        with open(_os.environ.get("PROF_STAGES", "/tmp/prof/stages.txt"), "a") as f:
            f.write("\\n".join(_PLOG) + "\\n")
        _PLOG.clear()
'''
def patch(path: Path) -> None:
    text = path.read_text()
    subs = [
        ("class EngineProcessError(RuntimeError):", HELPER + "\n\nclass EngineProcessError(RuntimeError):"),
        ("                message = conn.recv()\n", "                message = conn.recv()\n                _mark('ep_recv')\n"),
        ("    def extend(self, rid: int, row: int, start: int, tokens: np.ndarray) -> None:\n        with self._lock:",
         "    def extend(self, rid: int, row: int, start: int, tokens: np.ndarray) -> None:\n        _mark('ep_extend')\n        with self._lock:"),
        ("            if events:\n                self.conn.send_bytes(", "            if events:\n                _mark('ep_flush')\n                self.conn.send_bytes("),
        ("                    self._handle(events)\n", "                    _mark('rx_events')\n                    self._handle(events)\n"),
        ("            self._send((\"submit\", rid, list(rows), stream))", "            _mark('submit_send')\n            self._send((\"submit\", rid, list(rows), stream))"),
    ]
    for old, new in subs:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path.write_text(text)
def patch_sched(path: Path) -> None:
    text = path.read_text()
    subs = [
        ("class PollBudget:", HELPER + "\n\nclass PollBudget:"),
        ("                    pass_started = time.perf_counter()\n", "                    pass_started = time.perf_counter()\n                    _mark('loop_wake')\n"),
        ("        started = time.perf_counter()\n        if self._record is not None:\n            self._record.chunks",
         "        started = time.perf_counter()\n        _mark('start_in')\n        if self._record is not None:\n            self._record.chunks"),
        ("        rows, new_logits = self._prefill_isolating_faults(work)\n", "        rows, new_logits = self._prefill_isolating_faults(work)\n        _mark('prefill_ret')\n"),
        ("        flags, log_probs = self.readback.read()\n        read = time.perf_counter()\n",
         "        _mark('read_in')\n        flags, log_probs = self.readback.read()\n        read = time.perf_counter()\n        _mark('read_out')\n"),
    ]
    for old, new in subs:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path.write_text(text)
def patch_gen(path: Path) -> None:
    text = path.read_text()
    subs = [
        ("class ResourceError", HELPER + "\n\nclass ResourceError"),
        ("        start_dev, length_dev, slot_dev = ints\n", "        start_dev, length_dev, slot_dev = ints\n        _mark('pf_h2d')\n"),
        ("                out = torch.cat([graphs.prefill_chunk(", "                _mark('pf_graphs')\n                out = torch.cat([graphs.prefill_chunk("),
        ("                self.last_prefill_path = \"a graph per row\"\n", "                self.last_prefill_path = \"a graph per row\"\n                _mark('pf_cat')\n"),
    ]
    for old, new in subs:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path.write_text(text)
def patch_gpt(path: Path) -> None:
    text = path.read_text()
    subs = [
        ("class PrefillGraphs:", HELPER + "\n\nclass PrefillGraphs:"),
        ("        width = self._load(tokens, length, slot)\n        graph, logits = self.graphs.get(width) or self._capture(width)\n        graph.replay()\n",
         "        width = self._load(tokens, length, slot)\n        _mark('pg_loaded')\n        graph, logits = self.graphs.get(width) or self._capture(width)\n        graph.replay()\n        _mark('pg_replayed')\n"),
    ]
    for old, new in subs:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path.write_text(text)
def patch_sched2(path: Path) -> None:
    text = path.read_text()
    subs = [
        ("        self._spans.end(\"prefill\", begun)\n        if new_logits is None:\n            return\n",
         "        self._spans.end(\"prefill\", begun)\n        if new_logits is None:\n            return\n        _mark('start_mid')\n"),
        ("        self._batch = None\n\n    def _prefill_isolating_faults", "        self._batch = None\n        _mark('start_out')\n\n    def _prefill_isolating_faults"),
        ("        if rows:\n            self.table.write(rows)\n", "        _mark('pf_returned')\n        if rows:\n            self.table.write(rows)\n            _mark('table_written')\n"),
        ("        begun = self._spans.begin()\n        decode = self._select(batch, kv_len)\n", "        _mark('step_batch')\n        begun = self._spans.begin()\n        decode = self._select(batch, kv_len)\n        _mark('selected')\n"),
    ]
    for old, new in subs:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path.write_text(text)
for p in sys.argv[1:]:
    patch(Path(p))
    patch_sched(Path(p).parent / "scheduler.py")
    patch_sched2(Path(p).parent / "scheduler.py")
    patch_gen(Path(p).parent / "generation.py")
    patch_gpt(Path(p).parent / "gpt.py")
