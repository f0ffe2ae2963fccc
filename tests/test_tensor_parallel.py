"""Tensor parallelism of the torch engine (builder/runtime/tensor_parallel.py) on CPU: gloo, two processes.

- the sharding math, without processes: the converter's 2-gpu shard files, used as each rank uses them, reproduce
  the separately converted 1-gpu folder's products (column split: concatenated; row split: summed, its bias
  added once; LM head: vocabulary rows gathered by gather_vocab) and each rank's KV cache is its heads' share;
- a TP-2 engine (rank 0 here, a worker process) against the TP-1 engine on the same random weights: logits, greedy,
  beam and seeded sampling tokens;
- a worker killed mid-generation fails the call with an error naming it, and every later one;
- a launch that fails (a bad shard file, a worker that dies before joining the group) says why at once and
  leaves the process free to launch again;
- through real tritonservers: the TP-2 repository answers the seed's token-id request and the text ensemble with
  TP-1's tokens, and a worker killed during a streamed request fails it by name and ends the core's stub, which
  `dead_stubs()` (serve's check) then reports.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
import tritonclient.grpc as grpcclient

from builder.checkpoints import convert
from builder.render import render_repository
from builder.render_config import RenderConfig
from builder.runtime.core_adapter import CoreSettings
from builder.runtime.core_io import GenerationRequest
from builder.runtime.ft_weights import WeightFileError, load_ft_shard, load_ft_weights, tensor_specs
from builder.runtime.generation import ACTIVATION_RESERVE, GptEngine, ResourceError
from builder.runtime.gpt import GptModel
from builder.runtime.model_config import GptModelConfig
from builder.runtime.tensor_parallel import (RankWeights, TensorParallelEngine, TensorParallelError, TensorShard,
                                              launch_engine)
from builder.runtime.tokenizer import GptTokenizer
from builder.serve import TritonServer
from builder.validate import validate_repository
from client import TextClient
from engine_testing import END_ID, TinyGpt, random_prompts
from servers import server_on_free_ports

SEED_PROMPT = "1 2 3 4 5 6"
TEXT_PROMPTS = [SEED_PROMPT, "40 41 42", "Hello world", "The quick brown fox", "7 9 11"]


@pytest.fixture(scope="module")
def tiny_tp(tiny: TinyGpt, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The random tiny GPT as fp32 FT weights: (1-gpu folder, 2-gpu folder)."""
    out = tmp_path_factory.mktemp("tiny_tp")
    return tiny.ft_dir, convert(tiny.ft_dir.parent.parent / "hf", out, infer_gpu_num=2, weight_data_type="fp32",
                                progress=False)


def tp2_engine(model_dir: Path, **kwargs: Any) -> TensorParallelEngine:
    return launch_engine(model_dir, 2, device="cpu", worker_devices=["cpu"], dtype=torch.float32, max_batch_size=8,
                         **kwargs)


def assert_prefills_alike(tp1: GptEngine, tp2: GptEngine, *, rows: int, length: int, seed: int) -> None:
    """Both engines' prefill logits of the same random prompts agree (fp32 sums in another order)."""
    prompts = torch.tensor(random_prompts(rows, seed=seed, min_len=length, max_len=length))
    lengths = torch.full((rows,), length)
    with torch.inference_mode():
        torch.testing.assert_close(tp2.prefill_slots(prompts, lengths), tp1.prefill_slots(prompts, lengths),
                                   rtol=1e-4, atol=1e-4)


def workers_of(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children() if "tensor_parallel" in " ".join(p.cmdline())]


# ---- the sharding math, no processes --------------------------------------------------------------------------------


def test_shard_files_reproduce_the_unsharded_layer(tiny_tp: tuple[Path, Path]) -> None:
    # The reference is the 1-gpu folder, converted separately: merging the 2-gpu files would agree by construction.
    config, whole = load_ft_weights(tiny_tp[0])
    ranks = [load_ft_shard(tiny_tp[1], rank)[1] for rank in range(2)]
    for spec in tensor_specs(config):  # each rank holds its file as written: the TP-2 shape, nothing merged
        assert all(tuple(r[spec.stem].shape) == spec.rank_shape(2) for r in ranks), spec.stem
        if spec.split_axis is None:  # layer norms, embeddings and the row-parallel biases: whole on every rank
            assert all(torch.equal(r[spec.stem], whole[spec.stem]) for r in ranks), spec.stem
    h, n = config.hidden_size, 3
    x = torch.randn(n, h, generator=torch.Generator().manual_seed(0))
    p = "model.layers.0."
    # Column-parallel QKV [in, 3, out] + bias [3, out]: each rank computes its heads of q, k and v; side by side
    # they are the whole.
    qkv_w, qkv_b = p + "attention.query_key_value.weight", p + "attention.query_key_value.bias"
    qkv = (x @ whole[qkv_w].reshape(h, -1)).view(n, 3, h) + whole[qkv_b]
    parts = [(x @ r[qkv_w].reshape(h, -1)).view(n, 3, h // 2) + r[qkv_b] for r in ranks]
    torch.testing.assert_close(torch.cat(parts, dim=2), qkv)
    # Row-parallel attention-out: rank r multiplies its heads' columns of the attention output; the sum is the whole,
    # and the (unsplit) bias is added once, after the sum.
    out_w, out_b = p + "attention.dense.weight", p + "attention.dense.bias"
    attn = torch.randn(n, h, generator=torch.Generator().manual_seed(1))
    partial = [attn[:, r * h // 2:(r + 1) * h // 2] @ ranks[r][out_w] for r in range(2)]
    torch.testing.assert_close(partial[0] + partial[1] + ranks[0][out_b], attn @ whole[out_w] + whole[out_b])
    # The MLP: FC1 (and its bias) by columns, FC2 by rows, one sum at the end, FC2's bias once after it.
    fc1_w, fc1_b = p + "mlp.dense_h_to_4h.weight", p + "mlp.dense_h_to_4h.bias"
    fc2_w, fc2_b = p + "mlp.dense_4h_to_h.weight", p + "mlp.dense_4h_to_h.bias"

    def gelu(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(t, approximate="tanh")

    mlp = gelu(x @ whole[fc1_w] + whole[fc1_b]) @ whole[fc2_w] + whole[fc2_b]
    partial = [gelu(x @ r[fc1_w] + r[fc1_b]) @ r[fc2_w] for r in ranks]
    torch.testing.assert_close(partial[0] + partial[1] + ranks[0][fc2_b], mlp)


@pytest.mark.parametrize("vocab", [512, 5])  # 5: not divisible by 2, the last rank's rows are padded
def test_lm_head_vocabulary_rows_gather_to_the_whole_logits(vocab: int, monkeypatch: pytest.MonkeyPatch) -> None:
    table = torch.randn(vocab, 8, generator=torch.Generator().manual_seed(vocab))
    h = torch.randn(3, 8)
    shards = [TensorShard(rank=r, size=2, vocab_size=vocab) for r in range(2)]
    rows = [s.vocab_rows(table) for s in shards]
    assert all(r.shape == (-(-vocab // 2), 8) for r in rows)  # equal shapes: the last rank zero-padded
    logits = [h @ r.t() for r in rows]
    calls: list[int] = []

    def all_gather(out: torch.Tensor, mine: torch.Tensor, group: Any = None) -> None:
        """torch's all-gather into one tensor, for the ranks of this process: every rank's part, in rank order,
        stacked along dim 0."""
        assert out.shape == (2 * mine.shape[0], *mine.shape[1:]) and mine.is_contiguous()
        calls.append(next(r for r in range(2) if torch.equal(mine, logits[r])))
        out.copy_(torch.cat(logits))

    for name in ("all_gather_single", "all_gather_into_tensor"):  # whichever gather_vocab finds
        monkeypatch.setattr(torch.distributed, name, all_gather, raising=False)
    for shard in shards:  # the real gather_vocab of each rank gives the whole logits, padding dropped
        torch.testing.assert_close(shard.gather_vocab(logits[shard.rank]), h @ table.t())
    assert calls == [0, 1]


# ---- a TP-2 engine (this process + one worker) against TP 1 ---------------------------------------------------------


def test_tp2_engine_generates_tp1_tokens(tiny: TinyGpt, tiny_tp: tuple[Path, Path]) -> None:
    tp1 = GptEngine.from_ft_dir(tiny_tp[0], max_batch_size=8)
    tp2 = tp2_engine(tiny_tp[1])
    try:
        worker = workers_of(os.getpid())
        assert len(worker) == 1
        for env in (worker[0].environ(), os.environ):  # NVLink multicast off in every rank
            assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
        assert tp2.model.heads == tp1.model.heads // 2 and tp2.model.lm_head.shape[0] == 256  # it holds half
        # The KV cache rank 0 reports is the one it allocated: half of TP 1's.
        allocated = sum(t.numel() * t.element_size() for t in (*tp2.model.k_cache, *tp2.model.v_cache))
        assert tp2.kv_cache_bytes == allocated == tp1.kv_cache_bytes // 2
        assert_prefills_alike(tp1, tp2, rows=4, length=6, seed=3)
        requests = [GenerationRequest(input_ids=tuple(p), output_len=12, end_id=END_ID)
                    for p in random_prompts(6, seed=4)]
        requests += [GenerationRequest(input_ids=tuple(p), output_len=8, end_id=END_ID, beam_width=2)
                     for p in random_prompts(2, seed=5)]
        requests += [GenerationRequest(input_ids=tuple(p), output_len=10, end_id=END_ID, top_k=8, random_seed=11)
                     for p in random_prompts(2, seed=6)]
        expected = [[b.tolist() for b in out.beams] for out in tp1.generate(requests)]
        got = [[b.tolist() for b in out.beams] for out in tp2.generate(requests)]
        assert got == expected
    finally:
        tp2.close()
    assert not worker[0].is_running()
    assert tp2._leader is not None  # told to stop, the worker exited cleanly
    assert [w.returncode for w in tp2._leader.workers] == [0]


def test_every_rank_keeps_the_fp8_kv_cache(tiny_tp: tuple[Path, Path]) -> None:
    """kv_cache_dtype reaches the workers: TP 2 with an fp8 cache equals TP 1 with one (a worker caching its heads
    exactly would differ by the rounding)."""
    tp1 = GptEngine.from_ft_dir(tiny_tp[0], max_batch_size=8, kv_cache_dtype="fp8")
    tp2 = tp2_engine(tiny_tp[1], kv_cache_dtype="fp8")
    try:
        assert tp2.model.k_cache[0].dtype == torch.float8_e4m3fn and tp2.kv_cache_bytes == tp1.kv_cache_bytes // 2
        assert_prefills_alike(tp1, tp2, rows=3, length=5, seed=7)
        requests = [GenerationRequest(input_ids=tuple(p), output_len=8, end_id=END_ID)
                    for p in random_prompts(3, seed=8)]
        assert ([out.beams[0].tolist() for out in tp2.generate(requests)]
                == [out.beams[0].tolist() for out in tp1.generate(requests)])
    finally:
        tp2.close()


def test_killed_worker_fails_the_call_by_name_and_every_later_one(tiny_tp: tuple[Path, Path]) -> None:
    failures: list[str] = []
    tp2 = tp2_engine(tiny_tp[1], on_failure=failures.append)
    try:
        (worker,) = workers_of(os.getpid())
        long = [GenerationRequest(input_ids=(1, 2, 3), output_len=120, end_id=END_ID, bad_words=((END_ID,),))]
        errors: list[BaseException] = []
        steps = threading.Event()

        def run() -> None:
            try:
                tp2.generate(long, on_step=lambda _updates: steps.set())
            except BaseException as err:  # noqa: BLE001  (the test inspects it)
                errors.append(err)

        thread = threading.Thread(target=run)
        thread.start()
        assert steps.wait(30)
        worker.send_signal(signal.SIGKILL)
        thread.join(30)
        assert not thread.is_alive()
        expected = f"tensor-parallel worker rank 1 (pid {worker.pid}) died (killed by signal SIGKILL)"
        assert len(errors) == 1 and isinstance(errors[0], TensorParallelError), errors
        assert expected in str(errors[0])
        assert failures == [expected]  # told once
        with pytest.raises(TensorParallelError, match="rank 1"):  # at once: no collective with a dead rank
            tp2.generate(long)
    finally:
        tp2.close()


def test_a_worker_that_cannot_start_is_named(tiny_tp: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.runtime import tensor_parallel

    monkeypatch.setattr(tensor_parallel, "worker_python", lambda: "/bin/false")  # exits at once, status 1
    with pytest.raises(TensorParallelError, match="worker rank 1 exited with status 1 while starting"):
        tp2_engine(tiny_tp[1])
    assert not torch.distributed.is_initialized()  # rank 0 never waited for it to join


def test_a_bad_shard_file_is_named_and_the_next_launch_works(tiny_tp: tuple[Path, Path], tmp_path: Path) -> None:
    bad = tmp_path / "2-gpu"
    shutil.copytree(tiny_tp[1], bad)
    (bad / "model.layers.0.mlp.dense_h_to_4h.weight.1.bin").write_bytes(b"\0" * 16)
    # Every rank would refuse the same file list: rank 0 names it before any worker starts (not "rank 1 died", nor a
    # connection the worker closed while rank 0 still formed the group).
    with pytest.raises(WeightFileError, match=r"model\.layers\.0\.mlp\.dense_h_to_4h\.weight\.1\.bin: 16 bytes"):
        tp2_engine(bad)
    assert not torch.distributed.is_initialized()
    tp2_engine(tiny_tp[1]).close()  # so this process can start an engine again


def test_a_worker_that_dies_before_joining_is_named_at_once(tiny_tp: tuple[Path, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.runtime import tensor_parallel

    # Bounds the wait of a rank 0 that does not watch its workers while joining (5 min otherwise).
    monkeypatch.setattr(tensor_parallel, "STEP_TIMEOUT", datetime.timedelta(seconds=30))
    start = time.monotonic()
    # A GPU that is on no host (nor on a CPU-only build): the worker is ready, then fails to set its device.
    with pytest.raises(TensorParallelError, match=r"worker rank 1 \(pid \d+\) died \(exit status 1\) before "
                                                  "joining the process group"):
        launch_engine(tiny_tp[1], 2, device="cpu", worker_devices=["cuda:99"], dtype=torch.float32, max_batch_size=8)
    assert time.monotonic() - start < 20
    assert not torch.distributed.is_initialized()


def test_each_rank_sizes_its_kv_cache_by_its_own_heads(tiny_tp: tuple[Path, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory check that picks the slots on a GPU, run on CPU: rank 0 of 2 with a pretend device and free memory
    for 4.5 of its slots (what a rank caches: heads/2 of the heads)."""
    config, tensors = load_ft_shard(tiny_tp[1], 0, dtype=torch.float32, device="cpu")
    rank_slot = 2 * config.num_layer * (config.hidden_size // 2) * 64 * 4  # K and V, 64 tokens, fp32
    engine = TensorParallelEngine.__new__(TensorParallelEngine)
    engine.config, engine.device, engine._control = config, torch.device("cuda", 0), None
    engine.shard = TensorShard(rank=0, size=2, vocab_size=config.vocab_size)
    engine.model = GptModel(config, RankWeights(tensors, engine.shard), device="cpu", dtype=torch.float32)
    free = int(4.5 * rank_slot / (1 - ACTIVATION_RESERVE))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 1 << 40))
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, **kwargs: None)  # one rank: its own is least
    assert engine._slots_that_fit(8, 64, shrink=True) == 4
    assert engine.config is config  # the whole model's config again after the check
    with pytest.raises(ResourceError, match="a KV cache of max_batch_size=8 x max_seq_len=64 needs"):
        engine._slots_that_fit(8, 64, shrink=False)


# ---- settings, render and validate ----------------------------------------------------------------------------------


def test_core_settings_place_the_ranks() -> None:
    def settings(**params: str) -> CoreSettings:
        config = {"parameters": {k: {"string_value": v} for k, v in params.items()}, "max_batch_size": 8}
        import json

        return CoreSettings.from_args({"model_config": json.dumps(config), "model_repository": "/r",
                                       "model_version": "1"})

    assert settings().tp == 1
    gpus = settings(tensor_para_size="2", tp_devices="2,3")
    assert gpus.worker_devices("cuda:2") == ["cuda:3"] and gpus.model_dir == Path("/r/1/2-gpu")
    with pytest.raises(ValueError, match="Triton placed this instance on GPU 0"):
        gpus.worker_devices("cuda:0")
    assert settings(tensor_para_size="4").worker_devices("cuda:0") == ["cuda:1", "cuda:2", "cuda:3"]
    assert settings(tensor_para_size="2").worker_devices("cpu") == ["cpu"]
    with pytest.raises(ValueError, match="tp_devices must list 2 distinct GPU ids"):
        settings(tensor_para_size="2", tp_devices="1,1")


def test_render_and_validate_place_and_check_the_shards(tmp_path: Path, tiny_tp: tuple[Path, Path]) -> None:
    model = GptModelConfig.from_ini(tiny_tp[1] / "config.ini")
    repo = render_repository(RenderConfig(engine="torch", tp=2, gpus=(2, 3), checkpoint=tiny_tp[1], model=model,
                                          output=tmp_path / "gpu"))
    text = (repo / "gpt3_1.3b" / "config.pbtxt").read_text()
    assert "kind: KIND_GPU gpus: [2]" in text and 'string_value: "2,3"' in text
    assert validate_repository(repo) == []
    # No count (protobuf's 0) is one instance to Triton; two are not.
    assert "{ count: 1 kind: KIND_GPU" in text
    (repo / "gpt3_1.3b" / "config.pbtxt").write_text(text.replace("{ count: 1 kind:", "{ kind:"))
    assert validate_repository(repo) == []
    (repo / "gpt3_1.3b" / "config.pbtxt").write_text(text.replace("{ count: 1 kind:", "{ count: 2 kind:"))
    assert any("needs exactly one instance (rank 0 starts the other ranks), found 2" in p
               for p in validate_repository(repo))
    # A shard of the wrong shape, a placement that disagrees with tp_devices: both named.
    shard = repo / "gpt3_1.3b" / "1" / "2-gpu" / "model.layers.0.mlp.dense_h_to_4h.weight.1.bin"
    shard.unlink()
    shard.write_bytes(b"\0" * 16)
    (repo / "gpt3_1.3b" / "config.pbtxt").write_text(text.replace("gpus: [2]", "gpus: [3]"))
    problems = validate_repository(repo)
    assert any("model.layers.0.mlp.dense_h_to_4h.weight.1.bin: 16 bytes" in p for p in problems), problems
    assert any("instance_group gpus [3] must be [2]" in p for p in problems), problems
    with pytest.raises(ValueError, match="holds weights split for 1 GPU"):
        from builder.render import config_from_options

        config_from_options(tiny_tp[0], engine="torch", tp=2, output=tmp_path / "x")
    with pytest.raises(ValueError, match="--instances 2: with --tp 2"):
        RenderConfig(engine="torch", tp=2, instances=2, checkpoint=tiny_tp[1], model=model)


# ---- through tritonserver -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_tp2_dir(demo_nemo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(demo_nemo, tmp_path_factory.mktemp("demo_tp2"), infer_gpu_num=2, weight_data_type="fp32",
                   progress=False)


def render_tp2(ft_dir: Path, output: Path, streaming: bool, step_prompt_tokens: int = 0,
               text_in_core: bool = False) -> Path:
    model = GptModelConfig.from_ini(ft_dir / "config.ini")
    return render_repository(RenderConfig(engine="torch", device="cpu", data_type="fp32", tp=2, checkpoint=ft_dir,
                                          model=model, max_batch_size=16, streaming=streaming, output=output,
                                          step_prompt_tokens=step_prompt_tokens, text_in_core=text_in_core))


@pytest.fixture(scope="module")
def tp1_server(demo_repository: Path) -> Iterator[TritonServer]:
    with server_on_free_ports(demo_repository) as server:
        yield server


def token_id_request(server: TritonServer, prompt: list[int], output_len: int) -> np.ndarray:
    """The seed's token-id request to the core model (FT's contract, greedy), as test_ensemble sends it."""
    arrays = {"input_ids": np.array([prompt], np.uint32), "input_lengths": np.array([[len(prompt)]], np.uint32),
              "request_output_len": np.array([[output_len]], np.uint32),
              "runtime_top_k": np.array([[1]], np.uint32), "runtime_top_p": np.array([[0.0]], np.float32),
              "temperature": np.array([[1.0]], np.float32)}
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "FP32" if array.dtype == np.float32 else "UINT32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = grpcclient.InferenceServerClient(server.grpc_url).infer("gpt3_1.3b", inputs)
    return result.as_numpy("output_ids")


@pytest.mark.server
def test_served_tp2_answers_with_tp1_tokens(demo_tp2_dir: Path, tmp_path: Path, tp1_server: TritonServer) -> None:
    tokenizer = GptTokenizer.from_directory(demo_tp2_dir)
    with server_on_free_ports(render_tp2(demo_tp2_dir, tmp_path / "tp2", streaming=False)) as tp2_server:
        assert any("2-gpu on cpu + cpu (tensor-parallel)" in line
                   for line in Path(tp2_server.log_path).read_text().splitlines())
        for prompt in TEXT_PROMPTS:
            ids = tokenizer.encode(prompt)
            expected = token_id_request(tp1_server, ids, 30)
            assert token_id_request(tp2_server, ids, 30).tolist() == expected.tolist(), prompt
        with TextClient(tp1_server.http_url) as tp1, TextClient(tp2_server.http_url) as tp2:
            answers = [tp2.generate(prompt, max_tokens=24).text for prompt in TEXT_PROMPTS]
            assert answers == [tp1.generate(prompt, max_tokens=24).text for prompt in TEXT_PROMPTS]
    assert answers[0] == "".join(f" {n}" for n in range(7, 31))  # the seed example, as the demo answers it


@pytest.mark.server
def test_a_tp2_text_core_streams_the_tp1_text(demo_tp2_dir: Path, tmp_path: Path, tp1_server: TritonServer) -> None:
    """render --text-in-core over two ranks: the text comes from rank 0's stub, streamed and not."""
    repo = render_tp2(demo_tp2_dir, tmp_path / "tp2_text", streaming=True, text_in_core=True)
    with server_on_free_ports(repo) as server, TextClient(server.grpc_url, protocol="grpc") as tp2, \
            TextClient(tp1_server.http_url) as tp1:
        for prompt in TEXT_PROMPTS[:2]:
            expected = tp1.generate(prompt, max_tokens=16).text
            assert tp2.generate(prompt, max_tokens=16).text == expected, prompt
            assert "".join(tp2.stream(prompt, max_tokens=16)) == expected, prompt


@pytest.mark.server
def test_killed_worker_fails_the_streamed_request_and_ends_the_stub(demo_tp2_dir: Path, tmp_path: Path,
                                                                    tp1_server: TritonServer) -> None:
    # 16 prompt tokens per step: the 30-token prompt below is prefilled in chunks (GptEngine.prefill_chunks).
    repo = render_tp2(demo_tp2_dir, tmp_path / "tp2s", streaming=True, step_prompt_tokens=16)
    with server_on_free_ports(repo, log_verbose=1) as server:  # verbose: the scheduler's line about chunks
        (stub,) = [pid for pid, name in server.python_stubs().items() if name == "gpt3_1.3b_0_0"]
        (worker,) = workers_of(stub)
        with TextClient(server.grpc_url, protocol="grpc") as client, TextClient(tp1_server.http_url) as tp1:
            # The in-flight scheduler's path first: the same tokens as TP 1. The 30-token prompt arrives while
            # another stream decodes, so it is prefilled in chunks next to that decode (GptEngine.prefill_chunks).
            background: list[str] = []
            running = threading.Thread(target=lambda: background.extend(client.stream("5 6 7", max_tokens=90)))
            running.start()
            long_prompt = " ".join(str(n) for n in range(1, 31))
            with TextClient(server.grpc_url, protocol="grpc") as second:
                while not background:
                    time.sleep(0.01)
                assert "".join(second.stream(long_prompt, max_tokens=20)) == tp1.generate(long_prompt,
                                                                                          max_tokens=20).text
            running.join(60)
            assert "".join(background) == tp1.generate("5 6 7", max_tokens=90).text
            assert "was prefilled in chunks" in server.log_text()
            received: list[str] = []
            with pytest.raises(Exception) as failure:
                for delta in client.stream("1", max_tokens=120):
                    if not received:
                        worker.send_signal(signal.SIGKILL)
                    received.append(delta)
        assert received  # it was generating when the worker died
        expected = f"tensor-parallel worker rank 1 (pid {worker.pid}) died (killed by signal SIGKILL)"
        assert expected in str(failure.value)
        deadline = time.monotonic() + 20
        while server.dead_stubs() != ["gpt3_1.3b_0_0"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.dead_stubs() == ["gpt3_1.3b_0_0"]  # what makes `serve` stop with exit status 3
        assert expected in Path(server.log_path).read_text()
