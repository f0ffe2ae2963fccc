"""Prefill GEMM shapes at M tokens: cuBLAS F.linear vs alternatives (in CUDA graphs, 50 replays x 20 calls)."""
import sys, torch, torch.nn.functional as F
M = int(sys.argv[1]) if len(sys.argv) > 1 else 512
H = 2048
dev = "cuda"
torch.manual_seed(0)
shapes = {"qkv": (3 * H, H), "attn_out": (H, H), "fc1": (4 * H, H), "fc2": (H, 4 * H), "lm_head1": (50304, H)}
def timed(fn, reps=20):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    g.replay(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(True), torch.cuda.Event(True)
    a.record()
    for _ in range(50): g.replay()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) / 50 / reps * 1e3  # us
for name, (n, k) in shapes.items():
    m = 1 if name == "lm_head1" else M
    x = torch.randn(m, k, device=dev, dtype=torch.float16)
    w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
    bias = torch.randn(n, device=dev, dtype=torch.float16)
    flop = 2 * m * n * k
    t = timed(lambda: F.linear(x, w, bias))
    line = f"{name:9s} M={m} N={n} K={k}: linear+bias {t:7.1f} us {flop / t / 1e6:6.0f} TFLOP/s"
    if name == "fc1":
        t2 = timed(lambda: F.gelu(F.linear(x, w, bias), approximate="tanh"))
        t3 = timed(lambda: torch._addmm_activation(bias, x, w.t(), use_gelu=True))
        line += f" | +gelu {t2:7.1f} | cublasLt gelu epilogue {t3:7.1f}"
    t4 = timed(lambda: torch.mm(x, w.t()))
    line += f" | mm no bias {t4:7.1f}"
    try:
        xs = x.to(torch.float8_e4m3fn); ws = w.to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        t5 = timed(lambda: torch._scaled_mm(xs, ws.t(), scale_a=one, scale_b=one, bias=bias, out_dtype=torch.float16))
        line += f" | fp8 scaled_mm {t5:7.1f} ({flop / t5 / 1e6:.0f} TFLOP/s)"
    except Exception as err:
        line += f" | fp8 failed {err}"
    print(line, flush=True)
# elementwise floors at M x H
x = torch.randn(M, H, device=dev, dtype=torch.float16); y = torch.randn_like(x)
wln = torch.ones(H, device=dev, dtype=torch.float16); bln = torch.zeros_like(wln)
print(f"layer_norm {M}x{H}: {timed(lambda: F.layer_norm(x + y, (H,), wln, bln)):.1f} us (add + LN, eager)")
big = torch.randn(M, 4 * H, device=dev, dtype=torch.float16)
print(f"gelu {M}x{4*H}: {timed(lambda: F.gelu(big, approximate='tanh')):.1f} us")
