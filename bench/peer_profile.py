"""Where the PyTorch reference's training step spends its GPU time: the same step as
peer_segformer.py (HF transformers SegFormer, AdamW fused, cudnn.benchmark, bf16 autocast),
profiled for two steps after a warm-up with torch.profiler. Prints the top CUDA kernels by time
per step, as `segtrain-worker bench --profile` does for ours, so the two tables compare.

    python3 bench/peer_profile.py b3 bf16 8 [--trace $OUT/peer-trace.json]
"""
import argparse, os, sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_segformer import build  # noqa: E402  (the peer's own model builder)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variant")
    ap.add_argument("precision", choices=["bf16", "tf32"])
    ap.add_argument("batch", type=int)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--trace")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    amp = a.precision == "bf16"
    model = build(a.variant)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01, fused=True)
    x = torch.randn(a.batch, 3, a.size, a.size, device="cuda")
    y = torch.randint(0, 19, (a.batch, a.size, a.size), device="cuda")
    y[:, :64, :] = 255

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = model(pixel_values=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(4):
        step()
    torch.cuda.synchronize()
    steps = 2
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    if a.trace:
        prof.export_chrome_trace(a.trace)
    totals = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t, n = totals.get(e.name, (0.0, 0))
            totals[e.name] = (t + e.time_range.elapsed_us(), n + 1)
    all_ms = sum(t for t, _ in totals.values()) / 1e3 / steps
    print(f"peer {a.variant} {a.precision} batch {a.batch}: {all_ms:.1f} ms of CUDA kernels per step")
    print("| ms/step | % | calls/step | name |")
    print("|---|---|---|---|")
    for name, (t, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[: a.top]:
        ms = t / 1e3 / steps
        print(f"| {ms:.2f} | {100 * ms / all_ms:.1f} | {n / steps:.0f} | {name[:110]} |")


if __name__ == "__main__":
    main()
