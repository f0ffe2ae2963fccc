"""Tensor parallelism on two CUDA GPUs (NCCL): what tests/test_tensor_parallel.py shows on CPU, on the GPU path.

Skipped without two GPUs (CI has none): run on a two-GPU host before bench/tp_bench.py, e.g.
  $GPU_HOST_PYTHON -m pytest -q -p no:cacheprovider tests/test_tensor_parallel_cuda.py
Rank 0 runs in the test process on cuda:0, its worker on cuda:1; the TP-1 engine on cuda:0 is the reference.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from builder.checkpoints import convert
from builder.runtime.core_io import GenerationRequest
from builder.runtime.generation import GptEngine
from builder.runtime.tensor_parallel import TensorParallelError, launch_engine
from engine_testing import END_ID, TinyGpt, random_prompts

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.fixture(scope="module")
def split(tiny: TinyGpt, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(tiny.ft_dir.parent.parent / "hf", tmp_path_factory.mktemp("tp_cuda"), infer_gpu_num=2,
                   weight_data_type="fp32", progress=False)


def requests() -> list[GenerationRequest]:
    greedy = [GenerationRequest(input_ids=tuple(p), output_len=24, end_id=END_ID) for p in random_prompts(8, seed=7)]
    beams = [GenerationRequest(input_ids=tuple(p), output_len=8, end_id=END_ID, beam_width=2)
             for p in random_prompts(2, seed=8)]
    return greedy + beams


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tp2_on_two_gpus_generates_tp1_tokens(tiny: TinyGpt, split: Path, dtype: torch.dtype) -> None:
    tp1 = GptEngine.from_ft_dir(tiny.ft_dir, device="cuda:0", dtype=dtype, max_batch_size=8)
    tp2 = launch_engine(split, 2, device="cuda:0", worker_devices=["cuda:1"], dtype=dtype, max_batch_size=8)
    try:
        assert tp2.graphs is not None
        note = tp2.capture_graphs()  # decode and prefill graphs with the collectives inside, on both ranks
        assert "captured" in note, note
        tp1.capture_graphs()
        with torch.inference_mode():
            prompts = torch.tensor(random_prompts(4, seed=3, min_len=6, max_len=6), device="cuda:0")
            lengths = torch.full((4,), 6, device="cuda:0")
            tolerance = 1e-3 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(tp2.prefill_slots(prompts, lengths).float(),
                                       tp1.prefill_slots(prompts, lengths).float(), rtol=tolerance, atol=tolerance)
        expected = [[b.tolist() for b in out.beams] for out in tp1.generate(requests())]
        got = [[b.tolist() for b in out.beams] for out in tp2.generate(requests())]
        if dtype == torch.float32:
            assert got == expected
        else:  # fp16: another summation order may flip a near tie; most sequences must still be identical
            assert sum(a == b for a, b in zip(got, expected)) >= len(expected) - 2
    finally:
        tp2.close()


def test_a_dead_worker_on_gpus_fails_the_next_call_by_name(split: Path) -> None:
    failures: list[str] = []
    tp2 = launch_engine(split, 2, device="cuda:0", worker_devices=["cuda:1"], dtype=torch.float16, max_batch_size=4,
                        on_failure=failures.append)
    try:
        assert tp2._leader is not None
        (worker,) = tp2._leader.workers
        worker.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert failures == [f"tensor-parallel worker rank 1 (pid {worker.pid}) died (killed by signal SIGKILL)"]
        with pytest.raises(TensorParallelError, match="rank 1"):
            tp2.generate(requests()[:1])
    finally:
        tp2.close()
