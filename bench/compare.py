"""Our training step against the PyTorch reference, in one run on one GPU.

For each `variant:precision:batch` (precision bf16 or fp32; the reference runs fp32 as TF32,
which is what our fp32 does on CUDA too) this times `segtrain-worker bench` and
`peer_segformer.py` (HuggingFace transformers SegFormer, the issue's peer) with the same
variant, batch and 1024x1024 crop, prints both rows and the ratio of images/s, and appends the
table with the date, GPU and versions to bench/results.md (or $OUT/results.md when $OUT is set,
e.g. on the device machine; copy it into the repository afterwards).

    python3 bench/compare.py --worker target/release/segtrain-worker b3:bf16:8 b0:bf16:8 b5:bf16:8 b3:fp32:8
"""
import argparse, datetime, json, os, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))


def ours(worker, variant, precision, batch, crop, iters):
    out = subprocess.run(
        [worker, "bench", "--variant", variant, "--precision", precision, "--batch", str(batch),
         "--crop", str(crop), "--iters", str(iters), "--device", "cuda", "--json"],
        check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return dict(ms=r["ms_per_iter_median"], img_s=r["images_per_s"],
                peak_gib=r["peak_memory_bytes"] / 2**30, tflops=r["tflops"])


def peer(variant, precision, batch):
    arg = f"{variant}:{'bf16' if precision == 'bf16' else 'tf32'}:{batch}"
    out = subprocess.run([sys.executable, os.path.join(HERE, "peer_segformer.py"), arg],
                         check=True, capture_output=True, text=True).stdout
    r = next(json.loads(l) for l in out.splitlines() if l.startswith("{"))
    if "error" in r:
        return dict(error=r["error"])
    # Its TFLOP/s uses torch's flop counter, which overcounts the depthwise conv backward;
    # compare images/s and memory, and use our 3x-forward count for both.
    return dict(ms=r["ms"], img_s=r["img_s"], peak_gib=r["peak_gib"])


def versions():
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    import torch
    try:
        import transformers
        tv = transformers.__version__
    except ImportError:
        tv = "absent"
    return gpu, torch.__version__, tv


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--worker", default="target/release/segtrain-worker")
    p.add_argument("--crop", type=int, default=1024)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("plan", nargs="+")
    a = p.parse_args()
    rows = []
    for item in a.plan:
        v, prec, bs = item.split(":")
        o = ours(a.worker, v, prec, int(bs), a.crop, a.iters)
        r = peer(v, prec, int(bs))
        ratio = o["img_s"] / r["img_s"] if "img_s" in r else float("nan")
        rows.append((v, prec, int(bs), o, r, ratio))
    gpu, torch_v, tf_v = versions()
    lines = [f"### {datetime.date.today()} — {gpu}; torch {torch_v}, transformers {tf_v}", "",
             "| variant | precision | batch | ours ms/iter | ours images/s | ours peak GiB | ours TFLOP/s "
             "| reference ms/iter | reference images/s | reference peak GiB | ratio (images/s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, prec, bs, o, r, ratio in rows:
        ref = ("OOM", "", "") if "error" in r else (f"{r['ms']:.1f}", f"{r['img_s']:.1f}", f"{r['peak_gib']:.1f}")
        lines.append(f"| {v} | {prec} | {bs} | {o['ms']:.1f} | {o['img_s']:.1f} | {o['peak_gib']:.1f} | "
                     f"{o['tflops']:.0f} | {ref[0]} | {ref[1]} | {ref[2]} | {ratio:.2f}x |")
    text = "\n".join(lines) + "\n\n"
    print(text)
    dest = os.path.join(os.environ.get("OUT", HERE), "results.md")
    with open(dest, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
