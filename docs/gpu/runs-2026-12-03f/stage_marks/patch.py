# Appended to a rendered gpt_torch/1/model.py by run.py: marks in execute, pre/postprocessing and send.
# appended to a rendered gpt_torch model.py: stage timestamps (perf_counter = CLOCK_MONOTONIC, shared by processes)
import os as _os, time as _time
_LOG = []
def _mark(label):
    _LOG.append(f"{_os.getpid()} {label} {_time.perf_counter():.6f}")
    if len(_LOG) >= 40:
        with open(_os.environ.get("PROF_STAGES", "/tmp/prof/stages.txt"), "a") as f:
            f.write("\n".join(_LOG) + "\n")
        _LOG.clear()
_orig_exec = TritonPythonModel.execute
def _execute(self, requests):
    _mark(f"exec_in {self.__class__.__module__}")
    out = _orig_exec(self, requests)
    _mark("exec_out")
    return out
TritonPythonModel.execute = _execute
_orig_send = _Transport.send
def _send(self, reply, final):
    _mark("send_in")
    _orig_send(self, reply, final)
    _mark("send_out")
_Transport.send = _send
from gpt_runtime import text_core as _tc
_orig_req = _tc.TextCodec.requests
def _req(self, inputs):
    _mark("pre_in"); out = _orig_req(self, inputs); _mark("pre_out"); return out
_tc.TextCodec.requests = _req
_orig_reply = _tc.TextCodec.reply
def _rep(self, reply, passed):
    _mark("post_in"); out = _orig_reply(self, reply, passed); _mark("post_out"); return out
_tc.TextCodec.reply = _rep
