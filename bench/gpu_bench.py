#!/usr/bin/env python3
"""gpu_bench.py: the PyTorch side of bench/gpu-check.sh: torch.nn.functional.scaled_dot_product_attention
with the flash and cuDNN backends on the shapes of bench/gpu_bench.c (bf16, batch 1, 16 heads, D 128,
S 4K/8K/16K, causal and not; decode of 1 query over 32 heads / 8 KV heads), timed with CUDA events,
one JSON line per measurement (same keys as the C driver). Exit 77 without torch or a GPU.
Usage: gpu_bench.py [--summary distattn.jsonl torch.jsonl]  (the second form prints the ratios)."""
import json
import sys


def summary(ours_path, torch_path):
    rows = [json.loads(l) for p in (ours_path, torch_path) for l in open(p) if l.startswith("{")]
    key = lambda r: (r["op"], r.get("S"), r.get("mask", ""))
    ours = {key(r): r for r in rows if r["impl"] == "distattn" and "ms" in r}
    print("# op      S      mask     distattn_ms  flash_ms  cudnn_ms  flash/distattn  cudnn/distattn")
    for k, r in sorted(ours.items()):
        if r["op"] == "decode":
            continue
        t = {x["impl"]: x for x in rows if x["impl"] != "distattn" and key(x) == k and "ms" in x}
        f, c = t.get("torch-flash"), t.get("torch-cudnn")
        print("%-7s %-6d %-8s %11.3f %9s %9s %15s %15s" % (
            k[0], k[1], k[2], r["ms"], "%.3f" % f["ms"] if f else "-", "%.3f" % c["ms"] if c else "-",
            "%.2fx" % (f["ms"] / r["ms"]) if f else "-", "%.2fx" % (c["ms"] / r["ms"]) if c else "-"))
    for r in rows:
        if r["op"] == "decode" and r["impl"] == "distattn" and "ms" in r:
            print("decode S %d pages %d: %.1f GB/s, copy %.1f GB/s, ratio %.3f (target >= 0.85)" % (
                r["S"], r["pages"], r["GBps"], r["copy_GBps"], r["ratio_vs_copy"]))


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--summary":
        summary(sys.argv[2], sys.argv[3])
        return 0
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as e:  # noqa: BLE001
        print("# gpu_bench.py: torch unavailable (%s): skipped" % e)
        return 77
    if not torch.cuda.is_available():
        print("# gpu_bench.py: no CUDA device: skipped")
        return 77
    dev = torch.cuda.get_device_name(0)
    print("# gpu_bench.py: torch %s, device %s" % (torch.__version__, dev))
    backends = [("torch-flash", SDPBackend.FLASH_ATTENTION), ("torch-cudnn", SDPBackend.CUDNN_ATTENTION)]

    def timed(f, warm=2, iters=5):
        for _ in range(warm):
            f()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            f()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / iters

    H, D = 16, 128
    for S in (4096, 8192, 16384):
        for causal in (False, True):
            mask = "causal" if causal else "none"
            flops = 4.0 * S * S * H * D * (0.5 if causal else 1.0)
            q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            dout = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16)
            for name, be in backends:
                rec = {"op": "fwd", "impl": name, "device": dev, "dtype": "bf16", "S": S, "H": H, "D": D, "mask": mask}
                try:
                    with sdpa_kernel(be):
                        ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                        rec.update(ms=round(ms, 4), tflops=round(flops / ms * 1e-9, 2))
                        print(json.dumps(rec), flush=True)
                        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        bms = timed(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), 1, 3)
                        rb = dict(rec, op="bwd", ms=round(bms, 4), tflops=round(2.5 * flops / bms * 1e-9, 2))
                        print(json.dumps(rb), flush=True)
                except Exception as e:  # noqa: BLE001
                    rec["error"] = str(e).splitlines()[0][:200]
                    print(json.dumps(rec), flush=True)
            del q, k, v, dout
            torch.cuda.empty_cache()
    # decode: one query, 32 heads over 8 KV heads
    for S in (65536, 262144):
        q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for name, be in backends:
            rec = {"op": "decode", "impl": name, "device": dev, "dtype": "bf16", "S": S, "H": 32, "G": 8, "D": 128}
            try:
                with sdpa_kernel(be):
                    ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), 3, 20)
                rec.update(ms=round(ms, 4), GBps=round(S * 8 * 128 * 4 / ms * 1e-6, 1))
            except Exception as e:  # noqa: BLE001
                rec["error"] = str(e).splitlines()[0][:200]
            print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
