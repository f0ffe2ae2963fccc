"""bench/serving_bench.py (issue 17's serving benchmark): its metrics on hand-made perf_analyzer exports, its CPU
sampler, its exact-length prompts, and one end-to-end run on a tiny random model through a real tritonserver and
real perf_analyzer processes (tiny levels and 1 s windows: it checks the script and its JSON, not the numbers)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import serving_bench  # noqa: E402  (bench/'s scripts import each other by bare name: after the sys.path entry)
import triton_trace  # noqa: E402  (as above)
from serving_report import (GOALS, bucket_quantiles, goal_rows, histogram_buckets, markdown,  # noqa: E402  (as above)
                            run_metrics)

MS = 1_000_000  # ns


def _experiment(requests: list[dict], windows: int = 4) -> dict:
    return {"experiment": {"mode": "concurrency", "value": 2}, "requests": requests,
            "window_boundaries": [i * 1000 * MS for i in range(windows + 1)]}


def _request(sent_ms: float, stamps_ms: list[float], counts: list[int], asked: int) -> dict:
    return {"timestamp": int(sent_ms * MS), "request_inputs": {"max_tokens": asked, "min_tokens": asked},
            "response_timestamps": [int(t * MS) for t in stamps_ms],
            "response_outputs": [{"num_output_tokens": c, "text_output": "x"} for c in counts]}


def test_streamed_metrics_follow_the_definitions() -> None:
    # Sent in the stable windows (after 1000 ms): one per-token stream and one whose responses were coalesced.
    per_token = _request(1100, [1110, 1112, 1114, 1116], [1, 2, 3, 4], asked=4)
    coalesced = _request(1200, [1220, 1230], [1, 4], asked=4)
    warmup = _request(10, [20], [4], asked=4)  # first window: not counted
    opening = _request(10, [900], [4], asked=4)  # the other client's first request: the opening wave
    run = run_metrics("streamed", "ensemble", 2, True, throughput_rps=10.0,
                      experiment=_experiment([warmup, opening, per_token, coalesced]))
    assert run.requests == 2 and run.tokens_per_request == 4 and run.token_count_mismatches == 0
    assert run.output_tokens_per_s == pytest.approx(40.0)
    assert run.ttft_ms.p50 == pytest.approx((10 + 20) / 2)
    assert run.itl_ms.p50 == pytest.approx((6 / 3 + 10 / 3) / 2)
    assert run.responses_per_request == 3 and run.responses_per_token == pytest.approx(6 / 8)
    # Gaps per token: 2, 2, 2 ms (one token each) and 10 ms / 3 tokens.
    assert run.inter_response_ms.p50 == pytest.approx(2.0)
    assert run.latency_ms.p99 == pytest.approx(30, rel=0.02)
    assert run.opening_requests == 2 and run.opening_ttft_ms.p50 == pytest.approx((10 + 890) / 2)


def test_the_opening_wave_is_left_out_even_inside_the_stable_windows() -> None:
    # perf_analyzer stopped after 3 windows: the stable windows hold its opening wave (both clients' first requests,
    # sent at once), whose long TTFTs are a start-up burst, not what the steady load gets.
    burst = [_request(5, [400], [2], asked=2), _request(6, [700], [2], asked=2)]
    steady = [_request(1100, [1110, 1112], [1, 2], asked=2), _request(2100, [2120, 2130], [1, 2], asked=2)]
    run = run_metrics("streamed", "ensemble", 2, True, throughput_rps=10.0, experiment=_experiment(burst + steady, 3))
    assert run.requests == 2 and run.ttft_ms.p99 == pytest.approx(20, rel=0.02)
    assert run.opening_requests == 2 and run.opening_ttft_ms.p99 == pytest.approx(694, rel=0.02)
    # Not in concurrency mode (a request rate): no opening wave.
    rate = _experiment(burst + steady, 3) | {"experiment": {"mode": "request_rate", "value": 2}}
    assert run_metrics("streamed", "ensemble", 2, True, 10.0, rate).requests == 4


def test_core_tokens_come_from_sequence_length_and_short_answers_are_counted() -> None:
    core = {"timestamp": 1100 * MS, "request_inputs": {"input_lengths": 5, "request_output_len": 3},
            "response_timestamps": [1110 * MS, 1111 * MS, 1112 * MS],
            "response_outputs": [{"sequence_length": 6}, {"sequence_length": 7}, {"sequence_length": 8}]}
    short = _request(1100, [1150], [2], asked=4)  # stopped early: counted as 2, flagged
    run = run_metrics("core_streamed", "core", 1, True, 5.0, _experiment([core]))
    assert run.tokens_per_request == 3 and run.responses_per_token == 1.0 and run.ttft_ms.p50 == 10
    plain = run_metrics("not_streamed", "ensemble", 1, False, 5.0, _experiment([short]))
    assert plain.tokens_per_request == 2 and plain.token_count_mismatches == 1 and plain.ttft_ms is None


def test_the_engine_ttft_comes_from_its_histogram_between_two_scrapes() -> None:
    def scrape(counts: list[int]) -> str:  # two model instances, as Triton writes them
        lines = ["# HELP gpt_time_to_first_token_seconds x", "# TYPE gpt_time_to_first_token_seconds histogram"]
        for instance in ("a", "b"):
            for le, count in zip(("0.01", "0.1", "1", "+Inf"), counts):
                lines.append(f'gpt_time_to_first_token_seconds_bucket{{model="m",instance="{instance}",le="{le}"}} '
                             f"{count}")
            lines.append(f'gpt_time_to_first_token_seconds_count{{model="m",instance="{instance}"}} {counts[-1]}')
        lines.append('gpt_inter_token_latency_seconds_bucket{model="m",le="0.01"} 99')
        return "\n".join(lines)

    before = histogram_buckets(scrape([1, 2, 2, 2]), "gpt_time_to_first_token_seconds")
    assert before == {0.01: 2, 0.1: 4, 1.0: 4, math.inf: 4}
    # 100 more per instance: 90 under 10 ms, 8 under 100 ms, 1 under 1 s, 1 slower.
    after = histogram_buckets(scrape([91, 100, 101, 102]), "gpt_time_to_first_token_seconds")
    assert bucket_quantiles(before, after) == {"count": 200, "p50_at_most": 10.0, "p99_at_most": 1000.0}
    assert bucket_quantiles(after, after) is None  # nothing observed between the scrapes
    slow = histogram_buckets(scrape([0, 0, 0, 50]), "gpt_time_to_first_token_seconds")
    assert bucket_quantiles({}, slow) == {"count": 100, "p50_at_most": None, "p99_at_most": None}  # past the last


def test_goals_are_judged_and_unmeasured_ones_stay_open() -> None:
    rows = {row["key"]: row for row in goal_rows({"streamed_tokens_per_s_c64": 30_000, "mixed_ttft_p99_ms": 301,
                                                  "itl_p50_over_decode_ms_c1": 1.08})}
    assert len(rows) == len(GOALS)
    assert rows["streamed_tokens_per_s_c64"]["met"] is True
    assert rows["mixed_ttft_p99_ms"]["met"] is False
    assert rows["itl_p50_over_decode_ms_c1"]["met"] is True
    assert rows["streamed_tokens_per_s_c256"]["met"] is None
    assert "| mixed workload TTFT p99 <= 300 ms | 301 | **no** |" in markdown({"goals": list(rows.values())})


@pytest.mark.parametrize("with_psutil", [True, False])
def test_cpu_sampler_sees_a_busy_process(with_psutil: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not with_psutil:  # the GPU host's Python may lack psutil: /proc is read instead
        monkeypatch.setitem(sys.modules, "psutil", None)
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        with serving_bench.CpuSampler(busy.pid, interval_s=0.25) as sampler:
            time.sleep(1.6)
    finally:
        busy.kill()
        busy.wait()
    assert sampler.samples and sampler.max > 25  # a spinning process on a shared 2-core machine
    # Samples are placed on the wall clock, as perf_analyzer's measurement windows are.
    first, last = sampler.spans[0][0], sampler.spans[-1][1]
    assert first < last <= time.time_ns() and len(sampler.spans) == len(sampler.samples)
    assert sampler.max_within(first, last) == sampler.max
    assert sampler.max_within(sampler.spans[1][0], last) == max(sampler.samples[1:])
    assert sampler.max_within(0, first) is None
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    time.sleep(0.5)  # past the interpreter's start-up
    try:
        with serving_bench.CpuSampler(idle.pid, interval_s=0.25) as sampler:
            time.sleep(1.6)
    finally:
        idle.kill()
        idle.wait()
    assert sampler.samples and sampler.max < 25


def test_gpu_samples_are_summarized_and_unreadable_lines_left_out() -> None:
    text = "1980, 120.50, 40\n1755, 690.00, 61\n[N/A], [N/A], 45\n1830, 700.25, 63\n18"  # a cut last line
    assert serving_bench.gpu_summary(text) == {"gpu_sm_clock_mhz_p50": 1830.0, "gpu_sm_clock_mhz_min": 1755.0,
                                               "gpu_power_w_p50": 690.0, "gpu_temperature_c_max": 63.0,
                                               "gpu_samples": 3}
    assert serving_bench.gpu_summary("") is None and serving_bench.gpu_summary("[N/A], [N/A], [N/A]") is None


def test_the_gpu_sampler_runs_nvidia_smi_on_the_first_visible_gpu(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in nvidia-smi on PATH records its arguments and prints samples until it is stopped; without one the
    sampler records nothing (CPU hosts)."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\n"
                    "while true; do echo '1410, 300.5, 50'; sleep 0.05; done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    with serving_bench.GpuSampler(tmp_path / "run.gpu.csv") as sampler:
        time.sleep(0.5)
    assert sampler.process is not None and sampler.process.returncode is not None  # stopped with the run
    summary = sampler.summary()
    assert summary is not None and summary["gpu_sm_clock_mhz_p50"] == 1410 and summary["gpu_samples"] >= 2
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-i") + 1] == "3" and f"--query-gpu={serving_bench.GPU_QUERY}" in args
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with serving_bench.GpuSampler(tmp_path / "none.gpu.csv") as sampler:
        pass
    assert sampler.process is None and sampler.summary() is None


def test_the_host_cpu_is_named_with_its_clock(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Xeon X\ncpu MHz\t\t: 2100.000\n\n"
                       "processor\t: 1\nmodel name\t: Xeon X\ncpu MHz\t\t: 3500.123\n")
    assert serving_bench.host_cpu(cpuinfo) == "Xeon X, 2100 MHz"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Xeon X\n")  # no clock (some virtual machines)
    assert serving_bench.host_cpu(cpuinfo) == "Xeon X"
    assert serving_bench.host_cpu(tmp_path / "absent")  # not Linux: whatever the platform says


def test_mixed_prompts_have_exact_lengths() -> None:
    from client.perf import DEFAULT_TOKENIZER_DIR, load_tokenizer

    lengths = serving_bench.mixed_lengths(200, (16, 1024), (16, 512), seed=3)
    assert lengths == serving_bench.mixed_lengths(200, (16, 1024), (16, 512), seed=3)
    assert all(16 <= p <= 1024 and 16 <= o <= 512 for p, o in lengths)
    tokenizer = load_tokenizer(DEFAULT_TOKENIZER_DIR)
    prompts = serving_bench.prompts_of_lengths(tokenizer, [p for p, _ in lengths[:40]], seed=1)
    assert [len(tokenizer.encode(text).ids) for text, _ in prompts] == [p for p, _ in lengths[:40]]


def test_bad_options_name_the_option() -> None:
    with pytest.raises(serving_bench.BenchError, match="--mixed-prompt"):
        serving_bench.parse_args(["--out", "x.json", "--mixed-prompt", "20:10"])
    with pytest.raises(serving_bench.BenchError, match="--max-batch-size"):
        serving_bench.parse_args(["--out", "x.json", "--levels", "1,512"])
    args = serving_bench.parse_args(["--out", "x.json", "--render-option", "no_such_field=1"])
    with pytest.raises(serving_bench.BenchError, match="--render-option"):
        serving_bench.render_overrides(args)


def test_render_options_take_the_type_of_their_field() -> None:
    """`bool | None` fields (None: automatic) read true/false too: the string "false" would be true."""
    args = serving_bench.parse_args(["--out", "x.json", "--render-option", "engine_process=false",
                                     "--render-option", "text_in_core=true", "--render-option", "kv_slots=32",
                                     "--render-option", "kv_cache_dtype=fp8"])
    assert serving_bench.render_overrides(args) == {"engine_process": False, "text_in_core": True, "kv_slots": 32,
                                                    "kv_cache_dtype": "fp8"}


def test_bench_ensembles_declare_only_what_responses_carry(tmp_path: Path) -> None:
    """perf_analyzer 2.51 exports garbage (and, at a NaN, a truncated file) for declared outputs a response lacks."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from builder.render import render_repository
    from builder.render_config import RenderConfig

    repo = render_repository(RenderConfig(engine="torch", device="cpu", data_type="fp32", streaming=True,
                                          max_batch_size=8, output=tmp_path / "repo"))
    out = serving_bench.bench_models(repo, "ensemble", serving_bench.core_model_name(repo, "ensemble"),
                                     tmp_path / "bench")

    def read(name: str):
        return text_format.Parse((out / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())

    text, core = read(serving_bench.BENCH_TEXT), read(serving_bench.BENCH_CORE)
    assert sorted(o.name for o in text.output) == sorted(serving_bench.TEXT_OUTPUTS)
    mapped = {v for step in text.ensemble_scheduling.step for v in step.output_map.values()}
    assert not {v for v in mapped if not v.startswith("_")} - set(serving_bench.TEXT_OUTPUTS)
    assert [o.name for o in core.output] == list(serving_bench.CORE_TOKEN_OUTPUTS)
    assert {i.name for i in core.input} >= {"input_ids", "input_lengths", "request_output_len", "min_length"}
    assert (out / serving_bench.BENCH_TEXT / "1").is_dir() and (out / serving_bench.BENCH_CORE / "1").is_dir()


SMOKE = ["--device", "cpu", "--levels", "1,64", "--core-levels", "1", "--seconds", "0.5", "--mixed-seconds", "0.5",
         "--max-trials", "3", "--stability", "500", "--prompt-tokens", "8", "--new-tokens", "8",
         "--long-prompt-tokens", "32", "--bs1-reps", "3", "--mixed-clients", "64", "--mixed-prompt", "4:32",
         "--mixed-output", "4:16", "--mixed-entries", "128", "--max-batch-size", "64", "--trace-rate", "3"]


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_end_to_end_on_a_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "out" / "serving.json"
    completed = subprocess.run([sys.executable, str(ROOT / "bench" / "serving_bench.py"), "--work",
                                str(tmp_path / "work"), "--out", str(out), *SMOKE],
                               capture_output=True, text=True, timeout=280)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(out.read_text())
    assert not result.get("failed_runs"), result.get("failed_runs")

    for key in (*serving_bench.HEADLINE_KEYS, *(goal.key for goal in GOALS)):
        assert key in result, key
    unmeasured = {"streamed_tokens_per_s_c256"}  # 256 is not among the smoke levels
    for key in {*serving_bench.HEADLINE_KEYS, *(goal.key for goal in GOALS)} - unmeasured - {"gpu"}:
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]), (key, result[key])
    assert result["streamed_tokens_per_s_c256"] is None
    assert result["settings"]["host CPU"] == serving_bench.host_cpu()
    assert result["settings"]["prompt encoder"].startswith("tiktoken ")  # the fast path, as pyproject installs it

    runs = {(run["name"], run["concurrency"]): run for run in result["runs"]}
    assert set(runs) == {("streamed", 1), ("streamed", 64), ("not_streamed", 1), ("not_streamed", 64),
                         ("core_streamed", 1), ("mixed_not_streamed", 64), ("mixed_streamed", 64)}
    for (name, _), run in runs.items():
        assert run["requests"] > 0 and run["throughput_rps"] > 0, run
        assert run["token_count_mismatches"] == 0, run  # min_tokens = max_tokens held
        assert run["output_tokens_per_s"] == pytest.approx(run["throughput_rps"] * run["tokens_per_request"])
        assert run["client_cpu_percent_max"] is not None and run["client_cpu_percent_max"] >= 0
        # while perf_analyzer measured, never more than over its whole run (start-up and exit included)
        assert run["client_cpu_percent_max"] <= run["client_cpu_percent_max_whole_run"]
        assert 0 < run["responses_per_token"] <= 1.0 + 1e-9
        if name.startswith("mixed"):
            assert 4 <= run["tokens_per_request"] <= 16
        else:
            assert run["tokens_per_request"] == 8
        if "not_streamed" in name:
            assert run["responses_per_request"] == 1 and run["ttft_ms"] is None
        else:
            assert 0 < run["ttft_ms"]["p50"] <= run["latency_ms"]["p50"] and run["itl_ms"]["p50"] > 0
        # Triton's trace of one request in 3: each step of the streamed ensemble requests' first responses.
        traced = run.get("first_response_steps")
        if name in ("streamed", "mixed_streamed"):
            assert 0 < traced["requests"] <= run["requests"], run
            steps = traced["steps_ms"]
            assert list(steps) == [label for label, _, _ in triton_trace.STAGES]
            assert all(0 <= step["p50"] <= step["p90"] <= step["p99"] for step in steps.values()), steps
            # The steps add up to the whole first response, which perf_analyzer sees from outside.
            assert sum(step["mean_of_slowest"] for step in steps.values()) == pytest.approx(
                traced["first_response_ms"]["mean_of_slowest"])
            assert traced["first_response_ms"]["p50"] <= run["ttft_ms"]["p99"], (traced, run["ttft_ms"])
        else:
            assert traced is None, run
        # Every request reaches the engine, whose own histograms count it (warm-up windows too).
        assert run["engine_ttft_ms"]["count"] >= run["requests"], run
        assert run["engine_queue_ms"]["count"] == run["engine_ttft_ms"]["count"], run
    assert result["mixed_tokens_per_s_c64"] == runs[("mixed_not_streamed", 64)]["output_tokens_per_s"]
    assert result["mixed_ttft_p99_ms"] == runs[("mixed_streamed", 64)]["ttft_ms"]["p99"]
    assert 0 < result["responses_per_token_c1"] <= 1.0 + 1e-9
    assert result["ttft_ms_prompt512_bs1_streamed"] > 0 and result["decode_ms_per_token_bs1"] is not None
    # The batch-1 first responses come from perf_analyzer (the C++ client); the Python client's stay beside them.
    batch1 = result["batch1_perf_analyzer"]
    for key, name in (("ttft_ms_prompt512_bs1_streamed", "bs1_first_response"),
                      ("ttft_ms_prompt512_bs1_core_streamed", "bs1_core_first_response")):
        run = batch1[name]
        assert run["concurrency"] == 1 and run["requests"] > 0 and run["tokens_per_request"] == 4, run
        assert result[key] == run["ttft_ms"]["p50"] and result[f"{key}_p90"] == run["ttft_ms"]["p90"]
        assert result[f"{key}_python_client"] > 0
    assert batch1["bs1_first_response"]["model"] in ("ensemble", serving_bench.BENCH_TEXT)
    python = {key: result[f"ttft_ms_prompt512_bs1_{key}_python_client"] for key in ("streamed", "core_streamed")}
    overhead = python["streamed"] - python["core_streamed"]
    assert result["ensemble_overhead_ms_bs1_python_client"] == pytest.approx(overhead)
    assert result["ensemble_overhead_ms_bs1"] == pytest.approx(
        result["ttft_ms_prompt512_bs1_streamed"] - result["ttft_ms_prompt512_bs1_core_streamed"])
    assert result["client_cpu_percent_max"] > 0

    table = out.with_suffix(".md").read_text()
    assert "| goal | measured | met |" in table and all(goal.text in table for goal in GOALS)
    assert "## First response, step by step: mixed_streamed at 64" in table
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_a_text_core_is_benchmarked_through_a_one_step_ensemble(tmp_path: Path) -> None:
    """render --text-in-core: no token-id model to call; the text model gets the bench-only one-step ensemble."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from builder.render import render_repository
    from builder.render_config import RenderConfig

    repo = render_repository(RenderConfig(engine="torch", device="cpu", data_type="fp32", streaming=True,
                                          max_batch_size=8, text_in_core=True, output=tmp_path / "repo"))
    assert serving_bench.core_model_name(repo, "ensemble") is None
    out = serving_bench.bench_models(repo, "ensemble", None, tmp_path / "bench")
    text = text_format.Parse((out / serving_bench.BENCH_TEXT / "config.pbtxt").read_text(),
                             model_config_pb2.ModelConfig())
    assert [step.model_name for step in text.ensemble_scheduling.step] == ["ensemble"]
    assert sorted(o.name for o in text.output) == sorted(serving_bench.TEXT_OUTPUTS)
    assert {i.name for i in text.input} >= {"text_input", "max_tokens", "stream", "min_tokens"}
    assert not (out / serving_bench.BENCH_CORE).exists()


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_end_to_end_on_a_text_core_with_a_baseline(tmp_path: Path) -> None:
    """The core's batch-1 timings come from --baseline; the text path's overhead is computed against them."""
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"ttft_ms_prompt512_bs1_core_streamed": 1.5,
                                    "latency_ms_bs1_1token_core_not_streamed": 1.0, "commands": ["x"]}))
    out = tmp_path / "out" / "serving.json"
    options = ["--device", "cpu", "--levels", "2", "--seconds", "0.5", "--max-trials", "3", "--stability", "500",
               "--prompt-tokens", "8", "--new-tokens", "8", "--long-prompt-tokens", "32", "--bs1-reps", "3",
               "--max-batch-size", "8", "--skip-not-streamed", "--skip-mixed", "--render-option", "text_in_core=true",
               "--baseline", str(baseline)]
    completed = subprocess.run([sys.executable, str(ROOT / "bench" / "serving_bench.py"), "--work",
                                str(tmp_path / "work"), "--out", str(out), *options],
                               capture_output=True, text=True, timeout=280)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["render"]["text_in_core"] is True and not result.get("failed_runs")
    assert [(run["name"], run["concurrency"]) for run in result["runs"]] == [("streamed", 2)]
    assert result["runs"][0]["tokens_per_request"] == 8 and result["runs"][0]["token_count_mismatches"] == 0
    assert result["ensemble_overhead_ms_bs1"] == pytest.approx(result["ttft_ms_prompt512_bs1_streamed"] - 1.5)
    first_response = result["batch1_perf_analyzer"]["bs1_first_response"]
    assert result["ttft_ms_prompt512_bs1_streamed"] == first_response["ttft_ms"]["p50"]
    assert result["ensemble_overhead_ms_bs1_not_streamed"] == pytest.approx(
        result["latency_ms_bs1_1token_not_streamed"] - 1.0)


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_text_paths_times_the_three_paths_in_one_server(tmp_path: Path) -> None:
    """bench/text_paths.py: the classic ensemble, the text core and token ids, interleaved, on a tiny model."""
    out = tmp_path / "out" / "text_paths.json"
    completed = subprocess.run([sys.executable, str(ROOT / "bench" / "text_paths.py"), "--device", "cpu", "--work",
                                str(tmp_path / "work"), "--out", str(out), "--reps", "3", "--prompt-tokens", "24", "8"],
                               capture_output=True, text=True, timeout=280)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(out.read_text())
    assert list(result["prompts"]) == ["24", "8"] and result["host_cpu"] == serving_bench.host_cpu()
    assert result["prompt_encoder"].startswith("tiktoken ")
    for found in result["prompts"].values():
        for kind in ("ttft", "latency"):
            medians = {path: found[f"{kind}_ms_{path}"]["p50"] for path in ("ensemble", "text_core", "gpt3_1.3b")}
            assert all(0 < value <= found[f"{kind}_ms_{path}"]["p90"] for path, value in medians.items()), found
            for path in ("ensemble", "text_core"):
                assert math.isfinite(found[f"{kind}_{path}_over_ids_ms"])
    table = out.with_suffix(".md").read_text()
    assert "| 24 | first streamed response (4 new) |" in table and "| 8 | 1 new token, not streamed |" in table
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
