"""Registers and spills of the one-launch decode step (builder/runtime/step_kernel.py) per launch shape, without a GPU:
Triton compiles the kernel for sm_90 at the 1.3B shape, and the ptxas that Triton ships reports what a thread uses.
Registers decide how many programs a multiprocessor holds (64K registers), so how many weight bytes are in flight.

    python bench/step_kernel_registers.py                         # the A/B's shapes (bench/one_launch_step.py)
    python bench/step_kernel_registers.py 16384,4,3,168 32768,16,1,0 --trace

Needs Triton (any host: it compiles only); the numbers in StepLaunch's docstring come from Triton 3.6.0, the GPU
host's version.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench.one_launch_step import LAUNCHES
from builder.checkpoints.presets import PRESETS
from builder.runtime import step_kernel

SIGNATURE = {"tokens_ptr": "*i64", "positions_ptr": "*i64", "counters_ptr": "*i32", "trace_ptr": "*i64",
             "att_part_ptr": "*fp32", "out_part_ptr": "*fp32", "fc2_part_ptr": "*fp32", "eps": "fp32",
             "scale": "fp32", "key_splits": "i32", "cache_layer_stride": "i32", "max_seq": "i32",
             "ahead": "i32", "total": "i32", "qkv_s_ptr": "*fp32", "out_s_ptr": "*fp32", "fc1_s_ptr": "*fp32",
             "fc2_s_ptr": "*fp32"}
MATRIX_POINTERS = ("qkv_w_ptr", "out_w_ptr", "fc1_w_ptr", "fc2_w_ptr")  # int8 with --int8


def resources(step: step_kernel.OneLaunchStep, trace: bool) -> tuple[int, int]:
    """(registers a thread, bytes spilled) of the kernel compiled for sm_90 with the step's arguments."""
    kernel = step_kernel._one_launch_step_kernel
    constants = {**step.constexprs(), "TRACE": trace}
    names = kernel.arg_names
    signature = {name: "constexpr" if name in constants else SIGNATURE.get(name, "*fp16") for name in names}
    signature.update({name: "*i8" for name in MATRIX_POINTERS if step.scaled})
    # Tensors are 16-byte aligned when launched (Triton specializes on it: vector loads), so say so here too.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if signature[name].startswith("*")}
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=step.options())
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as work:
        ptx = Path(work) / "step.ptx"
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(work) / "step.cubin")],
                                capture_output=True, text=True, check=True).stderr
    return _number(r"Used (\d+) registers", report), _number(r"(\d+) bytes spill stores", report)


def _number(pattern: str, report: str) -> int:
    found = re.search(pattern, report)
    if found is None:
        raise RuntimeError(f"ptxas -v printed nothing like {pattern!r}:\n{report}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("launches", nargs="*", default=LAUNCHES, help="TILE,WARPS,PROGRAMS[,REGISTERS] each")
    parser.add_argument("--trace", action="store_true", help="the traced variant (bench/one_launch_step.py --trace)")
    parser.add_argument("--int8", action="store_true", help="the layers' matrices int8 (render --weight-quantization)")
    args = parser.parse_args()
    config = PRESETS["gpt3-1.3b"]
    shape = step_kernel.StepShape(hidden=config.hidden_size, inter=config.inter_size, heads=config.head_num,
                                  head_dim=config.size_per_head, layers=config.num_layer, vocab=config.vocab_size,
                                  max_seq=config.max_pos_seq_len, activation="gelu_tanh", eps=config.layernorm_eps)
    meta = torch.empty(0, dtype=torch.float16, device="meta")  # shapes only: nothing is allocated
    matrices = torch.empty(0, dtype=torch.int8 if args.int8 else torch.float16, device="meta")
    print(f"Triton {triton.__version__}, sm_90, the 1.3B shape{' (traced)' if args.trace else ''}"
          f"{', int8 matrices' if args.int8 else ''}")
    print(f"{'launch':16s} {'registers':>9s} {'spilled B':>9s} {'programs/SM':>11s} {'KiB of tiles held/SM':>19s}")
    for text in args.launches:
        launch = step_kernel.StepLaunch.parse(text)
        step = step_kernel.OneLaunchStep(shape, {"qkv_weight": matrices, "wte": meta}, meta, meta, launch, programs=1)
        registers, spilled = resources(step, args.trace)
        # Registers are handed out per warp in blocks of 256 (8 a thread).
        fit = 65536 // (-(-registers // 8) * 8 * 32 * launch.num_warps)
        held = min(fit, launch.programs_per_sm)
        print(f"{text:16s} {registers:9d} {spilled:9d} {f'{held} of {launch.programs_per_sm}':>11s} "
              f"{held * launch.tile_elements * matrices.element_size() // 1024:19d}")


if __name__ == "__main__":
    main()
