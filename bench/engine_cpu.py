"""Decode throughput of the PyTorch GPT engine (no Triton): tokens/s per batch size, random weights.

    python bench/engine_cpu.py                      # tiny preset on CPU, batch 1 and 8
    python bench/engine_cpu.py --preset gpt3-1.3b --device cuda:0 --dtype fp16 --batch-sizes 1 64

Decode rate = batch x (N - 1) / (t(N new tokens) - t(1 new token)): the prefill and first token are measured
separately and subtracted. Every row generates exactly N tokens (end_id lies outside the sampled vocabulary).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.checkpoints.presets import PRESETS
from builder.runtime.core_io import GenerationRequest
from builder.runtime.generation import GptEngine
from builder.runtime.gpt import expected_shapes
from builder.runtime.model_config import GptModelConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REAL_VOCAB = 50257  # GPT-2's tokens; ids above are padding and never generated here


def random_weights(config: GptModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("layernorm.weight"):
            weights[name] = torch.ones(shape)
        elif name.endswith("bias"):
            weights[name] = torch.zeros(shape)
        else:
            weights[name] = torch.randn(shape, generator=generator) * 0.02
    return weights


def timed_generate(engine: GptEngine, rows: list[GenerationRequest], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    engine.generate(rows)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench(engine: GptEngine, batch: int, prompt_len: int, new_tokens: int, repeats: int,
          sampling: dict[str, float]) -> dict[str, float]:
    vocab_limit = engine.vocab_limit
    generator = torch.Generator().manual_seed(batch)

    def rows(output_len: int) -> list[GenerationRequest]:
        prompts = torch.randint(0, vocab_limit, (batch, prompt_len), generator=generator).tolist()
        return [GenerationRequest(tuple(p), output_len=output_len, end_id=engine.config.vocab_size - 1,
                                  random_seed=i, **sampling) for i, p in enumerate(prompts)]

    timed_generate(engine, rows(new_tokens), engine.device)  # warm-up (CUDA graphs are captured here)
    first = min(timed_generate(engine, rows(1), engine.device) for _ in range(repeats))
    full = min(timed_generate(engine, rows(new_tokens), engine.device) for _ in range(repeats))
    decode_s = max(full - first, 1e-9)
    return {"batch": batch, "prefill_plus_first_token_ms": first * 1e3,
            "decode_ms_per_step": decode_s / (new_tokens - 1) * 1e3,
            "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads [default: torch's choice]")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = PRESETS[args.preset]
    max_seq_len = min(config.max_pos_seq_len, args.prompt_len + args.new_tokens)
    engine = GptEngine(config, random_weights(config), device=args.device, dtype=DTYPES[args.dtype],
                       max_batch_size=max(args.batch_sizes), max_seq_len=max_seq_len,
                       vocab_limit=min(REAL_VOCAB, config.vocab_size - 1))
    results = []
    for mode, sampling in (("greedy", {}), ("top_k=40,top_p=0.9", {"top_k": 40, "top_p": 0.9})):
        for batch in args.batch_sizes:
            result = {"mode": mode, **bench(engine, batch, args.prompt_len, args.new_tokens, args.repeats, sampling)}
            results.append(result)
            print(f"{args.preset} {args.dtype} {args.device} x{torch.get_num_threads()} {mode:>18} batch {batch:>3}: "
                  f"{result['decode_tokens_per_s']:10.0f} tok/s decode, {result['decode_ms_per_step']:7.3f} ms/step, "
                  f"prefill+first {result['prefill_plus_first_token_ms']:7.2f} ms", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "device": args.device, "dtype": args.dtype,
                                         "torch_threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
