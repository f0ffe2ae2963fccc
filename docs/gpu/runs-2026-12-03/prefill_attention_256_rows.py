"""Does the prefill attention kernel go wrong at 256 rows? (profile_decode.py's "+attention" at batch 256 showed a max
|dlogit| of 2.19 against the eager ops, 0.008 at 64 rows.)

1. `prefill_attention` and the eager SDPA against an fp32 reference (the CUDA tests' own), per row, at 64-300 rows.
2. The random 1.3B model's prefill of 64 and 256 prompts with and without the kernel, then one eager decode step from
   each prefill's own first token: which rows' first tokens differ, and the logits' and layer-0 K cache's errors.

Run from the repository root on a GPU host: python docs/gpu/runs-2026-12-03/prefill_attention_256_rows.py
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch
import torch.nn.functional as F

sys.path[:0] = [".", "tests"]

from bench.profile_decode import random_model  # noqa: E402
from builder.checkpoints.presets import PRESETS  # noqa: E402
from builder.runtime import gpt_kernels  # noqa: E402
from builder.runtime.gpt import DecodeKernels, prefill_attention_backends  # noqa: E402
from test_engine_cuda import _reference_prefill_attention  # noqa: E402


def rows_over(errors: torch.Tensor, limit: float) -> list[int]:
    return torch.nonzero(errors > limit).flatten().tolist()[:20]


def kernel_against_reference(heads: int = 16, head_dim: int = 128, width: int = 128) -> None:
    torch.manual_seed(0)
    for rows, max_seq in ((64, 1024), (128, 1024), (256, 1024), (256, 2048), (300, 512)):
        qkv = torch.randn(rows, width, 3 * heads * head_dim, device="cuda").half()
        k_cache = torch.zeros(rows, heads, max_seq, head_dim, device="cuda").half()
        v_cache = torch.zeros_like(k_cache)
        slots = torch.arange(rows, device="cuda")
        got_k, got_v = k_cache.clone(), v_cache.clone()
        got = gpt_kernels.prefill_attention(qkv, got_k, got_v, slots, None)
        want, want_k, _ = _reference_prefill_attention(qkv, k_cache, v_cache, slots, torch.zeros_like(slots))
        out_error = (got.float() - want).abs().amax(dim=(1, 2))  # [rows]
        k_error = (got_k.float() - want_k.float()).abs().amax(dim=(1, 2, 3))
        q, k, v = qkv.view(rows, width, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [rows, heads, T, d]
        with prefill_attention_backends():
            eager = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(rows, width, -1)
        eager_error = (eager.float() - want).abs().amax(dim=(1, 2))
        print(f"{rows} rows, cache {max_seq}: kernel max err {out_error.max():.4f} (rows over 0.05: "
              f"{rows_over(out_error, 0.05)}), K cache max err {k_error.max():.4f}; eager SDPA max err "
              f"{eager_error.max():.4f} (rows over 0.05: {rows_over(eager_error, 0.05)})", flush=True)
        del qkv, k_cache, v_cache, got_k, got_v, want_k
        torch.cuda.empty_cache()


@torch.inference_mode()
def model_with_and_without() -> None:
    model = random_model(PRESETS["gpt3-1.3b"], torch.device("cuda:0"), torch.float16)
    model.allocate_cache(256, 1024)
    generator = torch.Generator(device="cuda").manual_seed(1)
    for rows in (64, 256):
        prompt = torch.randint(100, 50000, (rows, 128), device="cuda", generator=generator)
        lengths = torch.full((rows,), 128, device="cuda")
        runs = []
        for kernels in (DecodeKernels(), replace(DecodeKernels(), attention=True)):
            model.kernels = kernels
            prefill = model.prefill(prompt, lengths).float()
            model.kernels = DecodeKernels()  # both decode eagerly, from their own first tokens
            decode = model.decode(prefill.argmax(-1), torch.full((rows,), 128, device="cuda"), 129).float()
            runs.append((prefill, decode, model.k_cache[0][:rows, :, :128].float().clone()))
        (prefill0, decode0, k0), (prefill1, decode1, k1) = runs
        flipped = torch.nonzero(prefill0.argmax(-1) != prefill1.argmax(-1)).flatten().tolist()
        prefill_error = (prefill0 - prefill1).abs().amax(dim=1)
        decode_error = (decode0 - decode1).abs().amax(dim=1)
        k_error = (k0 - k1).abs().amax(dim=(1, 2, 3))
        print(f"model, {rows} rows: first tokens differ in rows {flipped}; prefill logits max err "
              f"{prefill_error.max():.4f} (rows over 0.1: {rows_over(prefill_error, 0.1)}); decode logits max err "
              f"{decode_error.max():.4f} (rows over 0.1: {rows_over(decode_error, 0.1)}); layer-0 K max err "
              f"{k_error.max():.4f}", flush=True)


if __name__ == "__main__":
    kernel_against_reference()
    model_with_and_without()
