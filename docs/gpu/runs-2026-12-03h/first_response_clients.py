"""TTFT(512) at batch 1 on one text-core server: the Python gRPC client back to back, with 20 ms gaps, and
perf_analyzer (C++) at concurrency 1 (512-token prompt, 4 new tokens, streamed)."""
import statistics, sys, time, json
from pathlib import Path
sys.path[:0] = [str(Path.cwd()), str(Path.cwd() / "bench")]
import serving_bench as sb
import gpu_bench
from builder.serve import TritonServer
from client.perf import load_tokenizer, model_info, token_length_prompts

args = sb.parse_args(["--out", "/dev/null", *sys.argv[1:]])
args.work = gpu_bench.private_work_dir(args.work, "serving-bench")
raw = args.work / "raw"; raw.mkdir(parents=True, exist_ok=True)
result = {}
repo = sb.build_repository(args, result)
tokenizer = load_tokenizer(repo / args.ensemble / "1")
core = sb.core_model_name(repo, args.ensemble)
extra = sb.bench_models(repo, args.ensemble, core, args.work / "bench_models")
with TritonServer.on_free_ports(repo, startup_timeout_s=900, extra_args=[f"--model-repository={extra}"]) as server:
    url = server.grpc_url
    ens = model_info(url, "grpc", args.ensemble)
    triton = gpu_bench.Triton(url, streaming=True)
    for n in ((512, 128) if args.device != "cpu" else (100,)):
        (text, ids), = token_length_prompts(tokenizer, n, 1, seed=12 if n == 512 else 11)
        def py(gap, reps=60):
            for _ in range(3): triton.text(text, 4, stream=True)
            out = []
            for _ in range(reps):
                if gap: time.sleep(gap)
                out.append(triton.text(text, 4, stream=True)[0] * 1e3)
            return statistics.median(out), sorted(out)[int(0.9 * len(out))]
        for label, gap in (("python b2b", 0), ("python gap 20ms", 0.02), ("python b2b again", 0)):
            p50, p90 = py(gap)
            print(f"prompt {n}: {label}: p50 {p50:.3f} p90 {p90:.3f} ms", flush=True)
        runner = sb.Runner(url=url, raw=raw, seconds=3, stability=50, max_trials=4, server_pid=None,
                           max_threads=None, metrics_url=None, trace_folder=None, core="")
        data = {"data": [sb.ensemble_entry(text, 4, True, ens.inputs)]}
        run = runner.run(f"ttft{n}", sb.BENCH_TEXT, 1, True, data)
        print(f"prompt {n}: perf_analyzer c1 ({sb.BENCH_TEXT}): ttft {run.get('ttft_ms')}, "
              f"latency {run.get('latency_ms')}, client cpu {run.get('client_cpu_percent_max')}", flush=True)
        data = {"data": [sb.ensemble_entry(text, 4, True, ens.inputs)]}
        run = runner.run(f"ttft{n}_direct", args.ensemble, 1, True, data)
        print(f"prompt {n}: perf_analyzer c1 ({args.ensemble} direct): ttft {run.get('ttft_ms')}, "
              f"error {run.get('error')}", flush=True)
