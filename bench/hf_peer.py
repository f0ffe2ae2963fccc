"""The HF transformers peer of bench/gpu_bench.py, run in its own process.

It runs apart because the GPU host's transformers needs its own numpy 2 stack, while the Triton Python backend there
needs numpy 1.26 (see README.md, "On a GPU host"). Reads the FT weights (same files the server loads), writes JSON:
  hf_eager_ms_per_token_bs1, hf_static_ms_per_token_bs1 (slope of `generate` latency over new tokens, batch 1),
  greedy agreement of our tokens (from --ours) with HF fp16: exact position-wise, identical sequences, and
  teacher-forced (HF, fed our prefix, ranks our token first within an fp16 tolerance).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.checkpoints.hf import hf_model_from_canonical
from builder.runtime.ft_weights import load_ft_weights

END_ID = 50256
REAL_VOCAB = 50257  # ids above are embedding padding; the server never generates them (vocab_limit), nor may HF


def ms_per_token(model: torch.nn.Module, prompt: list[int], static: bool, lengths: tuple[int, int] = (32, 160),
                 reps: int = 3) -> float:
    ids = torch.tensor([prompt], device="cuda")
    kwargs: dict[str, object] = {"do_sample": False, "pad_token_id": END_ID}
    if static:
        kwargs["cache_implementation"] = "static"

    def run(new_tokens: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    for n in lengths:  # warm-up, and compilation where HF compiles a static-cache forward
        run(n)
    short = statistics.median(run(lengths[0]) for _ in range(reps))
    long = statistics.median(run(lengths[1]) for _ in range(reps))
    return (long - short) / (lengths[1] - lengths[0]) * 1000


def agreement(model: torch.nn.Module, prompts: list[list[int]], ours: list[list[int]], tolerance: float) -> dict:
    exact = total = identical = forced = 0
    padding_ids = list(range(REAL_VOCAB, model.config.vocab_size))
    with torch.no_grad():
        for prompt, generated in zip(prompts, ours):
            ids = torch.tensor([prompt], device="cuda")
            hf = model.generate(ids, max_new_tokens=len(generated), min_new_tokens=len(generated), do_sample=False,
                                pad_token_id=END_ID, suppress_tokens=padding_ids)[0, len(prompt):].tolist()
            exact += sum(a == b for a, b in zip(generated, hf))
            identical += hf == generated
            total += len(generated)
            full = torch.tensor([prompt + generated], device="cuda")
            logits = model(full).logits[0, len(prompt) - 1:-1, :REAL_VOCAB].float()  # what chose each of our tokens
            chosen = logits.gather(1, torch.tensor(generated, device="cuda")[:, None])[:, 0]
            forced += int((chosen >= logits.max(dim=1).values - tolerance).sum())
    return {"greedy_agreement_vs_hf_fp16": forced / total, "greedy_exact_token_agreement_vs_hf_fp16": exact / total,
            "greedy_identical_sequences": identical, "greedy_sequences": len(prompts),
            "teacher_forced_tolerance": tolerance}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ft", type=Path, required=True)
    parser.add_argument("--ours", type=Path, required=True, help='JSON {"prompts": [[ids]], "outputs": [[ids]]}')
    parser.add_argument("--timing-prompt", type=Path, required=True, help="JSON list of 128 token ids")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config, tensors = load_ft_weights(args.ft, dtype=torch.float16, device="cuda")
    model = hf_model_from_canonical(config, tensors).to("cuda", torch.float16).eval()
    del tensors
    prompt = json.loads(args.timing_prompt.read_text())
    result: dict[str, object] = {"transformers": __import__("transformers").__version__}
    result["hf_eager_ms_per_token_bs1"] = ms_per_token(model, prompt, static=False)
    try:
        result["hf_static_ms_per_token_bs1"] = ms_per_token(model, prompt, static=True)
    except Exception as err:  # noqa: BLE001  (record why the peer could not run)
        result["hf_static_error"] = repr(err)[:500]
    ours = json.loads(args.ours.read_text())
    result.update(agreement(model, ours["prompts"], ours["outputs"], tolerance=1e-2))
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
