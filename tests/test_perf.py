"""perf pieces that need no server: prompts of exact token length, input data, export parsing, report files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.perf import (DEFAULT_TOKENIZER_DIR, LevelRun, PerfConfig, PerfError, core_input_data,
                         ensemble_input_data, find_perf_analyzer, load_tokenizer, parse_concurrency,
                         perf_analyzer_env, token_length_prompts)
from client.perf_report import (LevelResult, Percentiles, added_latency, level_from_export, markdown_table, plot,
                                stable_requests)
from client.request import ModelInfo


@pytest.fixture(scope="module")
def tokenizer():
    loaded = load_tokenizer(DEFAULT_TOKENIZER_DIR)
    assert loaded.encode(" world").ids == [995]  # the real GPT-2 tables, not an empty tokenizer
    return loaded


@pytest.mark.parametrize("spec, levels", [("1:16:2", (1, 3, 5, 7, 9, 11, 13, 15)), ("1:4", (1, 2, 3, 4)),
                                          ("1,2,4,8", (1, 2, 4, 8)), ("3", (3,))])
def test_parse_concurrency(spec: str, levels: tuple[int, ...]) -> None:
    assert parse_concurrency(spec) == levels


@pytest.mark.parametrize("spec", ["0:4", "4:1", "a:b", "1:2:3:4", "", "1:4:0"])
def test_parse_concurrency_rejects(spec: str) -> None:
    with pytest.raises(PerfError):
        parse_concurrency(spec)


def test_prompts_have_exactly_the_requested_token_length(tokenizer) -> None:
    prompts = token_length_prompts(tokenizer, 128, 8, seed=3)
    assert len({text for text, _ in prompts}) == 8
    for text, ids in prompts:
        assert len(ids) == 128 and tokenizer.encode(text).ids == ids
    assert prompts == token_length_prompts(tokenizer, 128, 8, seed=3)  # reproducible


def test_input_data_gives_every_tensor_of_a_batch_1_request(tokenizer) -> None:
    prompts = token_length_prompts(tokenizer, 5, 2)
    streaming = ModelInfo("ensemble", frozenset({"text_input", "max_tokens", "stream", "exclude_input_in_output"}),
                          True, 8)
    data = ensemble_input_data(prompts, 64, streaming, stream=True)["data"]
    assert data[0] == {"text_input": [prompts[0][0]], "max_tokens": [64], "exclude_input_in_output": [True],
                       "stream": [True]}
    core = ModelInfo("gpt", frozenset({"input_ids", "input_lengths", "request_output_len"}), False, 8)
    entry = core_input_data(prompts, 64, core, stream=False)["data"][1]
    assert entry["input_ids"] == {"content": prompts[1][1], "shape": [5]}
    assert entry["input_lengths"]["content"] == [5] and entry["request_output_len"]["content"] == [64]


def _request(sent: int, responses: list[tuple[int, str]]) -> dict[str, object]:
    return {"timestamp": sent, "response_timestamps": [t for t, _ in responses],
            "response_outputs": [{"text_output": text} for _, text in responses]}


def test_streaming_metrics_follow_genai_perf_definitions() -> None:
    ms = 1_000_000
    # Two requests in the measured windows, one before them (warm-up) that must be ignored; the empty final
    # response of each stream ends its latency but is not a token.
    experiment = {
        "window_boundaries": [0, 100 * ms, 200 * ms, 300 * ms, 400 * ms],
        "requests": [_request(10 * ms, [(90 * ms, " z")]),
                     _request(100 * ms, [(110 * ms, " a"), (112 * ms, " b"), (114 * ms, " c"), (115 * ms, "")]),
                     _request(200 * ms, [(230 * ms, " a"), (240 * ms, " b"), (241 * ms, "")])],
    }
    assert len(stable_requests(experiment)) == 2
    result = level_from_export("ensemble", 2, 9.5, experiment, lambda texts: [len(t.split()) for t in texts],
                               streaming=True)
    assert result.requests == 2 and result.throughput_rps == 9.5
    assert result.ttft_ms is not None and result.itl_ms is not None and result.latency_ms is not None
    assert sorted([result.ttft_ms.p50, result.ttft_ms.avg]) == pytest.approx([20.0, 20.0])  # (10 + 30) / 2
    assert result.latency_ms.avg == pytest.approx((15 + 41) / 2)
    assert result.itl_ms.avg == pytest.approx((4 / 2 + 10 / 1) / 2)  # (last - first) / (tokens - 1)
    assert result.output_tokens_per_s == pytest.approx(5 / 0.141)  # 5 tokens from 100 ms to 241 ms
    assert result.output_tokens_per_request == pytest.approx(2.5)


def test_percentiles_match_numpy() -> None:
    values = list(np.random.default_rng(0).exponential(3.0, 1000))
    stats = Percentiles.of(values)
    assert stats is not None and stats.p99 == pytest.approx(np.percentile(values, 99))
    assert Percentiles.of([]) is None


def _level(model: str, level: int, p50: float, p99: float, ttft: float | None = None) -> LevelResult:
    latency = Percentiles(avg=p50, p50=p50, p90=p99, p95=p99, p99=p99)
    ttft_stats = None if ttft is None else Percentiles(avg=ttft, p50=ttft, p90=ttft, p95=ttft, p99=ttft)
    return LevelResult(model=model, concurrency=level, requests=10, throughput_rps=100.0 / level, latency_ms=latency,
                       ttft_ms=ttft_stats, itl_ms=ttft_stats, output_tokens_per_s=1000.0)


def test_added_latency_and_report_files(tmp_path: Path) -> None:
    ensemble = [_level("ensemble", 1, 12.0, 20.0, ttft=3.0), _level("ensemble", 2, 22.0, 40.0, ttft=5.0)]
    core = [_level("gpt", 1, 10.0, 15.0, ttft=2.0), _level("gpt", 2, 19.0, 30.0, ttft=4.5)]
    added = added_latency(ensemble, core)
    assert added == [{"concurrency": 1, "p50_ms": 2.0, "p99_ms": 5.0, "ttft_p50_ms": 1.0, "ttft_p99_ms": 1.0},
                     {"concurrency": 2, "p50_ms": 3.0, "p99_ms": 10.0, "ttft_p50_ms": 0.5, "ttft_p99_ms": 0.5}]
    table = markdown_table("perf", {"model": "ensemble"}, ensemble, core, added)
    assert "| ensemble | 2 | 50.00 | 22.00 | 40.00 | 5.00 |" in table and "| 2 | 3.00 | 10.00 | 0.50 | 0.50 |" in table
    plot(tmp_path / "plot.png", ensemble, core)
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(json.dumps(ensemble[0].to_json()))["latency_ms"]["p50"] == 12.0


def test_perf_config_and_command(tmp_path: Path) -> None:
    with pytest.raises(PerfError, match="--protocol grpc"):
        PerfConfig(output_dir=tmp_path, stream=True, protocol="http")
    with pytest.raises(PerfError, match="prompt_tokens"):
        PerfConfig(output_dir=tmp_path, prompt_tokens=0)
    config = PerfConfig(output_dir=tmp_path, server="gpu-host", protocol="grpc", stream=True)
    run = LevelRun("ensemble", 4, True, tmp_path / "in.json", tmp_path / "a.csv", tmp_path / "a.json")
    command = run.command(Path("/bin/perf_analyzer"), config)
    assert command[command.index("-u") + 1] == "gpu-host:8001" and command[command.index("-i") + 1] == "grpc"
    assert command[command.index("--concurrency-range") + 1] == "4"
    assert "--async" in command and "--streaming" in command and "--profile-export-file" in command


def test_perf_analyzer_is_found_and_runs() -> None:
    import subprocess

    binary = find_perf_analyzer()
    completed = subprocess.run([str(binary), "--version"], env=perf_analyzer_env(), capture_output=True, text=True,
                               timeout=30, check=False)
    assert "2.51" in completed.stdout + completed.stderr, completed.stderr  # needs libcudart.so.12 and libb64
