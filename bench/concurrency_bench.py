"""GPU benchmark of the batching engine at the real Qwen3-VL-8B shape (random bf16 weights, no download).

    python bench/concurrency_bench.py [--users 1 4 8 16 32 64] [--tokens 256] [--json OUT.json]

One run measures:
- single stream: turn-1 TTFT at 720p and 1080p (from the image, preprocessing included) against a
  bare prefill of the same tokens (vision tower + decoder through transformers, inputs already
  on the GPU); turn-2 TTFT after a 128-token answer; batch-1 decode tokens/s;
- concurrency: N conversations at once, each turn 1 with its own 1080p image, then turn 2 on the
  cached image, `--tokens` answers (no early end): total and per-user tokens/s, TTFT p50/p95,
  inter-token p95, per phase;
- arrival: 8 streams decoding when a new 1080p conversation arrives: its TTFT against the bare
  prefill, and the largest gap between two tokens of the 8 meanwhile;
- memory: one ~8k-token conversation (four 1080p images + 64 tokens) with the KV pool set as for
  a 24 GB card (`--small-kv-mb`), peak GPU memory.
Token times are taken inside the engine when each token is sampled (tiny-tokenizer text is not
one character per token, so stream events would not time tokens).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import threading
import time
from datetime import UTC, datetime

import torch
from common import QUESTION, REAL, SMOKE, build, copy_bandwidth, image_message, percentile, sync_time, weight_bytes
from PIL import Image

from chat.engine.local.engine import Engine
from chat.engine.local.runner import Runner
from chat.engine.types import ChatRequest, GenParams

TIMES: dict[int, list[float]] = {}  # id(request) -> sample times
KEEP: list = []  # every request stays alive, so no two ever share an id()
_lock = threading.Lock()
_advance = Engine._advance


def _recording_advance(self, seq, token, metrics):
    with _lock:
        TIMES.setdefault(id(seq.request), []).append(time.perf_counter())
    return _advance(self, seq, token, metrics)


Engine._advance = _recording_advance


def picture(w: int, h: int, seed: int) -> Image.Image:
    """A noisy picture (distinct per seed), as the store would hand it over."""
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h // 8, w // 8, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr).resize((w, h), Image.NEAREST)


class Bench:
    """The model, its engine and the pictures it can fetch."""

    def __init__(self, device: str, shape: dict, batch_tokens: int, kv_mb: int) -> None:
        t0 = time.perf_counter()
        self.model, self.processor, self.tf_version = build(device, shape)
        self.build_s = time.perf_counter() - t0
        self.images: dict[str, Image.Image] = {}
        self.runner = Runner(self.model, self.processor)
        t0 = time.perf_counter()
        self.engine = Engine(self.runner, self.images.__getitem__, max_waiting=512, max_context=16384,
                             kv_cache_bytes=kv_mb << 20, max_batch_tokens=batch_tokens, max_running=128,
                             max_running_per_owner=128)
        self.engine.start(warmup=True)
        self.engine.warmed.wait()
        assert self.engine.ready.is_set(), self.engine.warmup_error
        self.warmup_s = time.perf_counter() - t0

    def image(self, name: str, w: int, h: int, seed: int) -> str:
        self.images[name] = picture(w, h, seed)
        return name

    def submit(self, messages: list[dict], owner: str, tokens: int):
        req = ChatRequest(messages, GenParams(temperature=0.0, max_new_tokens=tokens), cache_salt=owner)
        KEEP.append(req)
        return req, time.perf_counter(), self.engine.submit(req)

    def bare_prefill(self, messages: list[dict]) -> float:
        """Vision tower + decoder over the same prompt through transformers, inputs on the GPU; best of 3."""
        from chat.engine.local.prompt import split_visual, template_messages
        from chat.images import detail_pixels

        tmpl, ids = template_messages(messages)
        text = self.processor.apply_chat_template(tmpl, tokenize=False, add_generation_prompt=True)
        lo, hi = detail_pixels("auto")
        pictures = [self.images[split_visual(i)[0]] for i in ids]
        inputs = self.processor(text=[text], images=pictures, return_tensors="pt",
                                size={"shortest_edge": lo, "longest_edge": hi}).to(self.model.device)
        best = float("inf")
        for _ in range(3):
            self.model.model.rope_deltas = None
            t0 = sync_time()
            with torch.inference_mode():
                self.model(**inputs, logits_to_keep=1)
            best = min(best, sync_time() - t0)
        return best


def ttft(req, submitted: float) -> float:
    return TIMES[id(req)][0] - submitted


def single_stream(b: Bench, tokens: int) -> dict:
    out = {}
    for name, (w, h) in {"720p": (1280, 720), "1080p": (1920, 1080)}.items():
        image = b.image(f"single-{name}", w, h, 1 if name == "720p" else 2)
        turn1 = [image_message(image)]
        req, t0, handle = b.submit(turn1, f"single-{name}", 128)
        done = handle.wait()
        first = ttft(req, t0)
        turn2 = turn1 + [{"role": "assistant", "content": done.text}, {"role": "user", "content": "What else?"}]
        req2, t2, handle2 = b.submit(turn2, f"single-{name}", 1)
        done2 = handle2.wait()
        out[name] = {"prompt_tokens": done.usage.prompt_tokens, "turn1_ttft_ms": first * 1e3,
                     "bare_prefill_ms": b.bare_prefill(turn1) * 1e3, "turn2_ttft_ms": ttft(req2, t2) * 1e3,
                     "turn2_cached": done2.usage.cached_tokens, "turn2_prompt": done2.usage.prompt_tokens}
        out[name]["turn1_vs_bare"] = out[name]["turn1_ttft_ms"] / out[name]["bare_prefill_ms"]
        out[name]["turn2_vs_turn1"] = out[name]["turn2_ttft_ms"] / out[name]["turn1_ttft_ms"]
    req, t0, handle = b.submit([{"role": "user", "content": "Tell me a long story."}], "decode-1", tokens)
    handle.wait()
    times = TIMES[id(req)]
    out["decode_tok_s"] = (len(times) - 1) / (times[-1] - times[0])
    return out


def phase(b: Bench, convs: list[list[dict]], owners: list[str], tokens: int) -> tuple[dict, list]:
    start = time.perf_counter()
    subs = [b.submit(m, o, tokens) for m, o in zip(convs, owners, strict=True)]
    dones = [h.wait() for _, _, h in subs]
    end = time.perf_counter()
    ttfts = [ttft(r, t) for r, t, _ in subs]
    gaps, rates = [], []
    for req, _, _ in subs:
        t = TIMES[id(req)]
        gaps += [y - x for x, y in zip(t, t[1:], strict=False)]
        if len(t) > 1:
            rates.append((len(t) - 1) / (t[-1] - t[0]))
    generated = sum(d.usage.completion_tokens for d in dones)
    stats = {"total_tok_s": generated / (end - start), "per_user_tok_s": statistics.median(rates),
             "ttft_p50_ms": percentile(ttfts, 50) * 1e3, "ttft_p95_ms": percentile(ttfts, 95) * 1e3,
             "itl_p95_ms": percentile(gaps, 95) * 1e3, "wall_s": end - start,
             "cached_tokens": sum(d.usage.cached_tokens for d in dones)}
    return stats, dones


def concurrency(b: Bench, users: list[int], tokens: int) -> dict:
    out = {}
    for n in users:
        imgs = [b.image(f"c{n}-{i}", 1920, 1080, 1000 * n + i) for i in range(n)]
        convs = [[image_message(img)] for img in imgs]
        owners = [f"user-{n}-{i}" for i in range(n)]
        turn1, dones = phase(b, convs, owners, tokens)
        convs2 = [c + [{"role": "assistant", "content": d.text}, {"role": "user", "content": "And the colours?"}]
                  for c, d in zip(convs, dones, strict=True)]
        turn2, _ = phase(b, convs2, owners, tokens)
        out[n] = {"turn1": turn1, "turn2": turn2}
        print(n, json.dumps(out[n]), flush=True)
        b.engine.pool.clear_cache()
        b.engine.vision.cache.clear()
    return out


def arrival(b: Bench, budget: int) -> dict:
    b.engine.scheduler.max_batch_tokens = budget
    streams = [b.submit([{"role": "user", "content": f"Story {i}: go on and on."}], f"arr-{budget}-{i}", 1500)
               for i in range(8)]
    while min(len(TIMES.get(id(r), [])) for r, _, _ in streams) < 20:
        time.sleep(0.005)
    newcomer = [image_message(b.image(f"arrival-{budget}", 1920, 1080, 77 + budget))]  # nothing cached
    req, t0, handle = b.submit(newcomer, f"arr-new-{budget}", 4)
    handle.wait()
    first = TIMES[id(req)][0]
    gaps = []
    for r, _, _ in streams:
        t = [x for x in TIMES[id(r)] if t0 - 0.05 <= x <= first + 0.05]
        gaps += [y - x for x, y in zip(t, t[1:], strict=False)]
    for _, _, h in streams:
        h.cancel()
    bare = b.bare_prefill(newcomer)
    return {"batch_tokens": budget, "ttft_ms": (first - t0) * 1e3, "bare_prefill_ms": bare * 1e3,
            "ttft_vs_bare": (first - t0) / bare,
            "others_max_gap_ms": max(gaps) * 1e3 if gaps else float("nan"),
            "others_p95_gap_ms": percentile(gaps, 95) * 1e3}


def long_conversation(b: Bench, kv_mb: int) -> dict:
    b.engine.pool.clear_cache()
    b.engine.vision.cache.clear()
    b.engine.resize_pool(kv_mb << 20)
    b.engine.graphs = None  # the captured graphs point at the old pool
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    imgs = [b.image(f"long-{k}", 1920, 1080, 500 + k) for k in range(4)]
    msg = {"role": "user", "content": [*({"type": "image", "image_id": i} for i in imgs),
                                       {"type": "text", "text": QUESTION}]}
    t0 = time.perf_counter()
    _, _, handle = b.submit([msg], "long", 64)
    done = handle.wait()
    return {"tokens": done.usage.prompt_tokens + done.usage.completion_tokens, "kv_cache_mb": kv_mb,
            "seconds": time.perf_counter() - t0, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--arrival-budgets", type=int, nargs="+", default=[256, 512, 1024, 2048],
                    help="token budgets per step to run the arrival test with")
    ap.add_argument("--small-kv-mb", type=int, default=1400, help="KV pool for the 24 GB-card memory check")
    ap.add_argument("--json", default="")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: checks the script, measures nothing")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = "cpu" if args.smoke else "cuda"
    b = Bench(device, SMOKE if args.smoke else REAL, args.batch_tokens, 0)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU smoke run"
    result = {"gpu": gpu, "date": datetime.now(UTC).isoformat(timespec="minutes"), "torch": torch.__version__,
              "transformers": b.tf_version, "python": platform.python_version(), "build_s": b.build_s,
              "warmup_s": b.warmup_s, "kv_blocks": b.engine.pool.total, "graphs": getattr(b.engine.graphs, "sizes", []),
              "args": vars(args)}
    if device == "cuda":
        bw = copy_bandwidth()
        result["floor_tok_s"] = bw / weight_bytes(b.model)
    print(json.dumps(result), flush=True)
    result["single"] = single_stream(b, args.tokens)
    print(json.dumps(result["single"]), flush=True)
    result["concurrency"] = concurrency(b, args.users, args.tokens)
    result["arrival"] = [arrival(b, budget) for budget in args.arrival_budgets]
    print(json.dumps(result["arrival"]), flush=True)
    if device == "cuda":
        result["long"] = long_conversation(b, args.small_kv_mb)
        print(json.dumps(result["long"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    b.engine.shutdown()


if __name__ == "__main__":
    main()
