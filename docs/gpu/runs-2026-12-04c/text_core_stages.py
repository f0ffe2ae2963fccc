"""docs/gpu/runs-2026-12-04/text_core_stages.py with marks for the current text path and for each update's way out.

    python docs/gpu/runs-2026-12-04c/text_core_stages.py --out OUT/text_core_stages.json --device cpu --instrument \
        [text_paths.py options]

The earlier helper (one server, the text core and the token-id core interleaved, Triton's trace of each, marks inside
both stubs with --instrument) runs unchanged but for its marks: the text core's mark moves to the current
`TextCore.submit` line, and each streamed update is marked on its way out of the stub too: u the receiver hands it to
the sink, r the text core's transport (after the FT arrays; only the text core passes there), y model.py's
sender.send, U sent. The eighteenth session ran it on the project VM only (text_core_stages_cpu.txt). A GPU-run
helper, not part of the product.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

_EARLIER = Path(__file__).resolve().parents[1] / "runs-2026-12-04" / "text_core_stages.py"
_spec = importlib.util.spec_from_file_location("text_core_stages", _EARLIER)
assert _spec is not None and _spec.loader is not None
stages = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stages)

TEXT_CORE_MARK = ("gpt_runtime/text_core.py", "        (request,) = _or_replies(1, lambda: core_requests(",
                  "        _mark('t')\n")
UPDATE_MARKS = (
    ("gpt_runtime/engine_process.py", "            remote.sink.update(outputs)\n", "            _mark('u')\n"),
    ("gpt_runtime/engine_process.py", "            remote.updates += 1\n", "            _mark('U', True)\n"),
    ("gpt_runtime/text_core.py", "        self.transport.send(self.codec.reply(reply, self.passed), final)\n",
     "        _mark('r')\n"),
    ("model.py", "        self.sender.send(_response(reply), flags=", "        _mark('y')\n"),
)
UPDATE_SPANS = {"update: FT arrays": ("u", "r"), "update: text reply": ("r", "y"),
                "update: to the response": ("u", "y"),
                "update: response + send": ("y", "U"),
                "update: whole": ("u", "U")}
stages.PATCHES = tuple(TEXT_CORE_MARK if patch[0] == TEXT_CORE_MARK[0] else patch
                       for patch in stages.PATCHES) + UPDATE_MARKS
_request_spans = stages.spans


def spans(log: Path) -> dict[str, float]:
    """The earlier helper's spans, then the updates' (medians in ms, after the warm-up)."""
    out = _request_spans(log)
    records = [json.loads(line) for line in log.read_text().splitlines()][stages.WARMUP:]
    for label, (a, b) in UPDATE_SPANS.items():
        values = [(r[b] - r[a]) * 1e3 for r in records if a in r and b in r]
        if values:
            out[label] = statistics.median(values)
    return out


stages.spans = spans

if __name__ == "__main__":
    stages.main()
