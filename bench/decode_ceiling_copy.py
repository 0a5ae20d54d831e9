#!/usr/bin/env python3
# Copied unchanged from /work/shared/tools/decode_ceiling.py (outside the repo, so the device run cannot see it).
# ruff: noqa
"""Near-ideal batched decode step for the Qwen3-VL-8B text decoder shape (36 layers, hidden 4096,
32 q / 8 kv heads x 128, MLP 12288, vocab 151,936), bf16, random weights, captured in one CUDA
graph: plain matmuls + SDPA over each sequence's used KV only (ctx tokens each). No norms/rotary
(they are small), so this is an optimistic ceiling for what a paged batching engine can reach."""
import argparse, time, torch
import torch.nn.functional as F
dev, dt = "cuda", torch.bfloat16
L, Hd, NQ, NKV, D, M, V = 36, 4096, 32, 8, 128, 12288, 151936
g = torch.Generator(device=dev).manual_seed(0)
def w(*s): return (torch.randn(*s, device=dev, dtype=dt, generator=g) * 0.02)
layers = [dict(qkv=w((NQ + 2 * NKV) * D, Hd), o=w(Hd, NQ * D), gu=w(2 * M, Hd), dn=w(Hd, M)) for _ in range(L)]
head = w(V, Hd)
print(torch.cuda.get_device_name(), torch.__version__)
def run(B, ctx):
    x0 = torch.randn(B, Hd, device=dev, dtype=dt)
    ks = [torch.randn(B, NKV, ctx, D, device=dev, dtype=dt) for _ in range(L)]
    vs = [torch.randn(B, NKV, ctx, D, device=dev, dtype=dt) for _ in range(L)]
    def step():
        x = x0
        for i, p in enumerate(layers):
            qkv = x @ p["qkv"].t()
            q = qkv[:, :NQ * D].view(B, NQ, 1, D)
            a = F.scaled_dot_product_attention(q, ks[i], vs[i], enable_gqa=True).reshape(B, NQ * D)
            x = x + a @ p["o"].t()
            gu = x @ p["gu"].t()
            x = x + (F.silu(gu[:, :M]) * gu[:, M:]) @ p["dn"].t()
        return (x @ head.t()).argmax(-1)
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph): out = step()
    for _ in range(5): graph.replay()
    torch.cuda.synchronize(); n = 50; t = time.perf_counter()
    for _ in range(n): graph.replay()
    torch.cuda.synchronize(); ms = (time.perf_counter() - t) / n * 1e3
    kv_gb = 2 * L * B * NKV * ctx * D * 2 / 1e9
    del ks, vs; torch.cuda.empty_cache()
    return ms, kv_gb
wgb = sum(p[k].numel() for p in layers for k in p) * 2 / 1e9 + head.numel() * 2 / 1e9
x = torch.empty(int(4e9) // 2, dtype=dt, device=dev); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): y.copy_(x)
torch.cuda.synchronize(); bw = 2 * 4e9 * 10 / (time.perf_counter() - t) / 1e12
del x, y; torch.cuda.empty_cache()
print(f"weights read per step {wgb:.1f} GB; measured copy bandwidth {bw:.2f} TB/s")
print("| batch | ctx/seq | step ms | tok/s total | bytes floor ms |")
ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--ctx", type=int, nargs="+", default=[2048], help="context tokens per sequence")
ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16, 32, 64], help="batch sizes")
args = ap.parse_args()
for B, ctx in [(b, c) for c in args.ctx for b in args.batch]:
    ms, kv = run(B, ctx)
    print(f"| {B} | {ctx} | {ms:.2f} | {B * 1000 / ms:.0f} | {(wgb + kv) / bw:.2f} |")
