"""Stage marks of the first token (see ../README.md): python run.py DEVICE WORK PROMPT_TOKENS REPS [text_paths options]
with PROF_STAGES (marks file), PROF_CLIENT (client times, JSON) and PROF_GAP (seconds between requests) set."""
import sys, time, json
from pathlib import Path
ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import text_paths as tp, gpu_bench
from serving_bench import core_call_times
from builder.serve import TritonServer
from builder.runtime.tokenizer import GptTokenizer
import os
HERE = Path(__file__).resolve().parent
STAGES = Path(os.environ.get("PROF_STAGES", "/tmp/prof/stages.txt"))
args = tp.parse_args(["--device", sys.argv[1], "--out", "/tmp/prof/x.json", "--work", sys.argv[2], *sys.argv[5:]])
classic, text = tp.build(args, {})
patch = (HERE / "patch.py").read_text()
for m in (classic / "gpt3_1.3b/1/model.py", text / "text_core/1/model.py"):
    m.write_text(m.read_text() + "\n" + patch)
import subprocess
for r in (classic / "gpt3_1.3b/1/gpt_runtime/engine_process.py", text / "text_core/1/gpt_runtime/engine_process.py"):
    subprocess.run([sys.executable, str(HERE / "patch_ep.py"), str(r)], check=True)
STAGES.unlink(missing_ok=True)
tok = GptTokenizer.from_directory(text / "text_core" / "1")
n = int(sys.argv[3])
prompt = gpu_bench.text_prompt(tok, n, seed=n); ids = tok.encode(prompt)
client = []
with TritonServer.on_free_ports(classic, startup_timeout_s=900, extra_args=[f"--model-repository={text}"]) as server:
    tr = gpu_bench.Triton(server.grpc_url, streaming=True)
    for rep in range(int(sys.argv[4])):
        for path in ("text_core", "gpt3_1.3b"):
            t0 = time.perf_counter()
            if path == "gpt3_1.3b":
                times = core_call_times(tr, path, ids, 4, True)
            else:
                times = tr.text(prompt, 4, stream=True, model=path)
            client.append((path, t0, t0 + times[0], t0 + times[-1]))
            time.sleep(float(os.environ.get('PROF_GAP', '0.02')))
Path(os.environ.get("PROF_CLIENT", "/tmp/prof/client.json")).write_text(json.dumps(client))
