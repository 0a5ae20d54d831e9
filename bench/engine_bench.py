"""GPU benchmark: the vlchat engine against plain `generate`, at the real Qwen3-VL-8B shape with random weights.

No download: the model is built from its config with random bf16 weights on the GPU. The
tokenizer is vlchat's tiny byte-level one with the image token ids wired into the config, so
prompts, images and the processor are real while the weights are noise. Generation never stops
on an end token (none is set), so every run decodes exactly the requested number of tokens.

    python bench/engine_bench.py [--out bench/RESULTS.md] [--decode-tokens 256]

Measures, in one run on one GPU: turn-1 TTFT from image bytes (preprocessing included) at
1280x720 and 1920x1080; turn-2 TTFT with that image in the history; batch-1 decode tokens/s;
peak GPU memory; the bandwidth floor (weight bytes per token over measured copy bandwidth); and
checks that engine and `generate` agree on the first greedy tokens of the same prompt.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat.engine.loader import TINY_CHAT_TEMPLATE, _tiny_tokenizer  # noqa: E402
from chat.engine.prompt import split_visual, template_messages  # noqa: E402
from chat.engine.runner import Runner  # noqa: E402
from chat.engine.types import ChatRequest, Delta, GenParams  # noqa: E402
from chat.engine.worker import Engine  # noqa: E402
from chat.images import detail_pixels  # noqa: E402

REAL = dict(
    text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
              num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20]),
    vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                deepstack_visual_indexes=[8, 16, 24]),
)
# A CPU-sized stand-in, only to smoke-test this script where there is no GPU.
SMOKE = dict(
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, mrope_section=[2, 3, 3]),
    vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                deepstack_visual_indexes=[0, 1]),
)


def build(device: str, shape: dict):
    """Random-weight Qwen3-VL of `shape` (bf16 on GPU), with real processor pieces."""
    import transformers
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tok = _tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                     "<|vision_end|>")}
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=151936, max_position_embeddings=262144,
                         **{k: v for k, v in shape["text"].items() if k != "mrope_section"},
                         rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0,
                                              mrope_section=shape["text"]["mrope_section"], mrope_interleaved=True)),
        vision_config=dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                           **shape["vision"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in the target dtype: no fp32 copy of 8.8 B weights
    try:
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(default)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2,
                                              size={"shortest_edge": 65536, "longest_edge": 16777216},
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tok, video_processor=Qwen3VLVideoProcessor(), chat_template=TINY_CHAT_TEMPLATE,
    )
    return model, processor, transformers.__version__


def png_bytes(w: int, h: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h // 8, w // 8, 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(arr).resize((w, h), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def copy_bandwidth() -> float:
    """Measured device-to-device copy, bytes read + written per second."""
    if not torch.cuda.is_available():
        return float("nan")
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(10):
        t0 = sync_time()
        y.copy_(x)
        times.append(sync_time() - t0)
    return 2 * x.numel() / statistics.median(times)


QUESTION = "Describe this picture in detail, including every object, colour and any text you can read there."


def messages(image_id: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image_id": image_id}, {"type": "text", "text": QUESTION}]}]


def run_engine(engine: Engine, msgs, n: int, session: str | None) -> tuple[float, float, object]:
    """(seconds to first token, seconds total, Done) for one request through the worker."""
    t0 = time.perf_counter()
    handle = engine.submit(ChatRequest(msgs, GenParams(temperature=0.0, max_new_tokens=n), session=session))
    first = None
    for event in handle.events():
        if first is None:
            first = time.perf_counter()
        if not isinstance(event, Delta):
            done = event
    total = time.perf_counter() - t0
    return (first - t0 if first else total), total, done


def generate_baseline(model, processor, image_bytes: dict, msgs, n: int) -> tuple[float, list[int]]:
    """Plain transformers: processor + generate, greedy, n new tokens; (seconds, new token ids)."""
    t0 = sync_time()
    tmpl, ids = template_messages(msgs)
    text = processor.apply_chat_template(tmpl, tokenize=False, add_generation_prompt=True)
    images = [Image.open(io.BytesIO(image_bytes[split_visual(i)[0]])).convert("RGB") for i in ids]
    lo, hi = detail_pixels("auto")  # the engine's default budget, so both see the same tokens
    inputs = processor(text=[text], images=images, return_tensors="pt",
                       size={"shortest_edge": lo, "longest_edge": hi}).to(model.device)
    model.model.rope_deltas = None
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return sync_time() - t0, out[0, inputs["input_ids"].shape[1]:].tolist()


def _prefill(runner: Runner, engine: Engine, msgs):
    """Regular prefill of `msgs` from scratch: (prompt, kv, last logits)."""
    prompt, opened = engine.build_prompt(msgs)
    shas = [split_visual(s.image_id)[0] for s in prompt.images]
    feats = runner.encode([opened.get(i) or engine.fetch_image(i) for i in shas], "auto")
    kv = runner.new_cache()
    spans = [(s.start, f) for s, f in zip(prompt.images, feats, strict=True)]
    return prompt, kv, runner.forward(prompt.ids, prompt.positions, 0, kv, spans)


def engine_greedy(runner: Runner, engine: Engine, msgs, n: int) -> list[int]:
    """Greedy ids through the engine's eager decode path (no worker)."""
    prompt, kv, logits = _prefill(runner, engine, msgs)
    out, tok = [], int(logits.argmax(-1))
    for i in range(n):
        out.append(tok)
        logits = runner.forward([tok], torch.full((3, 1), prompt.next_position + i), len(prompt.ids) + i, kv)
        tok = int(logits.argmax(-1))
    return out


def fast_greedy(runner: Runner, engine: Engine, msgs, n: int) -> list[int]:
    """Greedy ids through the engine's fast path: regular prefill, then the captured decode step."""
    prompt, kv, logits = _prefill(runner, engine, msgs)
    engine.fast.load(kv, len(prompt.ids))
    out, tok = [], int(logits.argmax(-1))
    for i in range(n):
        out.append(tok)
        tok = int(engine.fast.step(tok, prompt.next_position + i, len(prompt.ids) + i, 0.0, 1.0).item())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/RESULTS.md")
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: checks the script, measures nothing")
    args = ap.parse_args()
    n = args.decode_tokens
    device = "cpu" if args.smoke else "cuda"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU smoke run"
    t0 = time.perf_counter()
    model, processor, tf_version = build(device, SMOKE if args.smoke else REAL)
    print(f"built model in {time.perf_counter() - t0:.1f} s on {gpu}", flush=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters())
    weight_bytes += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    bandwidth = copy_bandwidth()
    floor = bandwidth / weight_bytes

    images = {"720p": png_bytes(1280, 720, 1), "1080p": png_bytes(1920, 1080, 2)}
    from chat.images import open_clean

    runner = Runner(model, processor)
    # 9,216 tokens of context: room for the 8k-token conversation below (the decode buffer is sized by it).
    engine = Engine(runner, lambda i: open_clean(images[i]), max_context=9216)
    t0 = time.perf_counter()
    engine.start(warmup=True)
    engine.ready.wait()
    print(f"engine warm-up {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for res in ("720p", "1080p"):
        msgs = messages(res)
        # Baseline: a cold start each time (its turn 2 re-prefills everything).
        generate_baseline(model, processor, images, msgs, 2)  # warm kernels for this shape
        base_ttft, _ = generate_baseline(model, processor, images, msgs, 1)
        engine.prefix.clear()
        engine.features.clear()
        engine._grids.clear()
        ttft1, _, done1 = run_engine(engine, msgs, 1, session=res)
        msgs2 = msgs + [{"role": "assistant", "content": "It shows shapes."},
                        {"role": "user", "content": "What colour is the top left corner?"}]
        base_ttft2, _ = generate_baseline(model, processor, images, msgs2, 1)
        ttft2, _, done2 = run_engine(engine, msgs2, 1, session=res)
        rows.append((res, done1.usage.prompt_tokens, base_ttft, ttft1, base_ttft2, ttft2, done2.usage.cached_tokens))
        print(rows[-1], flush=True)

    # Bare prefill forward of the same 1080p turn-1 tokens (encoder + decoder, no engine around it).
    prompt, opened = engine.build_prompt(messages("1080p"))
    img = open_clean(images["1080p"])
    bare = []
    for _ in range(3):
        t0 = sync_time()
        feats = runner.encode([img], "auto")
        runner.forward(prompt.ids, prompt.positions, 0, runner.new_cache(), [(prompt.images[0].start, feats[0])])
        bare.append(sync_time() - t0)
    bare_prefill = min(bare)

    # Decode: batch 1, n tokens.
    msgs = messages("720p")
    base_total, base_ids = generate_baseline(model, processor, images, msgs, n)
    base_ttft, _ = generate_baseline(model, processor, images, msgs, 1)
    base_tps = (n - 1) / (base_total - base_ttft)
    engine.prefix.clear()
    e_ttft, e_total, done = run_engine(engine, msgs, n, session=None)
    _, e_ttft1, _ = run_engine(engine, msgs, 1, session=None)
    engine_tps = (n - 1) / (e_total - e_ttft1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")

    # One conversation of ~8k tokens: four 1080p images, prefill + 64 decoded tokens.
    if device == "cuda":
        engine.prefix.clear()
        engine.features.clear()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for k in range(4):
        images[f"big{k}"] = png_bytes(1920, 1080, 10 + k)
    long_msgs = [{"role": "user", "content": [*({"type": "image", "image_id": f"big{k}"} for k in range(4)),
                                              {"type": "text", "text": QUESTION}]}]
    _, long_total, long_done = run_engine(engine, long_msgs, 64, session="long")
    long_peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    long_tokens = long_done.usage.prompt_tokens + long_done.usage.completion_tokens

    # One decode step alone (runner.forward of one token on a ~1k-token cache), synchronised:
    # tells the model's own step time apart from the worker's per-token work around it.
    prompt, opened = engine.build_prompt(msgs)
    kv = runner.new_cache()
    sha = split_visual(prompt.images[0].image_id)[0]
    feats = runner.encode([opened.get(sha) or engine.fetch_image(sha)], "auto")
    runner.forward(prompt.ids, prompt.positions, 0, kv, [(prompt.images[0].start, feats[0])])
    steps = []
    for i in range(30):
        t0 = sync_time()
        runner.forward([65], torch.full((3, 1), prompt.next_position + i), len(prompt.ids) + i, kv)
        steps.append(sync_time() - t0)
    step_ms = statistics.median(steps[5:]) * 1000
    fast_ms = float("nan")
    if engine.fast is not None:
        engine.fast.load(kv, len(prompt.ids))
        fast_steps = []
        for i in range(30):
            t0 = sync_time()
            engine.fast.step(65, prompt.next_position + i, len(prompt.ids) + i, 0.0, 1.0)
            fast_steps.append(sync_time() - t0)
        fast_ms = statistics.median(fast_steps[5:]) * 1000

    ours = engine_greedy(runner, engine, msgs, 16)
    agree = next((i for i, (a, b) in enumerate(zip(ours, base_ids[:16], strict=False)) if a != b), 16)
    fast_agree = float("nan")
    if engine.fast is not None:
        fast = fast_greedy(runner, engine, msgs, 16)
        fast_agree = next((i for i, (a, b) in enumerate(zip(fast, ours, strict=False)) if a != b), 16)

    date = datetime.now(UTC).strftime("%Y-%m-%d")
    lines = [
        f"## {date} — {gpu}",
        "",
        f"Command: `python bench/engine_bench.py --decode-tokens {n}`; torch {torch.__version__}, "
        f"transformers {tf_version}, Python {platform.python_version()}; Qwen3-VL-8B shape, random bf16 "
        "weights, sdpa, batch 1.",
        "",
        "| measurement | plain `generate` | vlchat engine |",
        "| --- | --- | --- |",
    ]
    for res, ptoks, b1, e1, b2, e2, cached in rows:
        lines.append(f"| turn-1 TTFT {res} ({ptoks} prompt tokens, from image bytes) | {b1 * 1000:.0f} ms | "
                     f"{e1 * 1000:.0f} ms |")
        lines.append(f"| turn-2 TTFT {res} in history ({cached} tokens reused) | {b2 * 1000:.0f} ms | "
                     f"{e2 * 1000:.0f} ms |")
    lines += [
        f"| bare prefill forward, 1080p turn 1 (encoder + decoder) | {bare_prefill * 1000:.0f} ms | |",
        f"| decode, batch 1, {n} tokens | {base_tps:.1f} tok/s | {engine_tps:.1f} tok/s |",
        f"| one decode step alone, synchronised: eager `runner.forward` / captured graph | {step_ms:.1f} ms | "
        f"{fast_ms:.2f} ms |",
        f"| decode vs bandwidth floor / vs `generate` | | {engine_tps / floor:.0%} / {engine_tps / base_tps:.1f}x |",
        f"| peak GPU memory (runs above) | | {peak:.1f} GiB |",
        f"| one conversation of {long_tokens} tokens (four 1080p images + 64 decoded): time / peak memory | | "
        f"{long_total:.2f} s / {long_peak:.1f} GiB |",
        f"| bandwidth floor: {weight_bytes / 1e9:.1f} GB of decoder weights per token at "
        f"{bandwidth / 1e12:.2f} TB/s measured copy | {floor:.0f} tok/s | |",
        f"| greedy tokens equal to `generate` (first 16): eager engine path | | {agree} |",
        f"| greedy tokens of the captured fast path equal to the eager engine path (first 16) | | {fast_agree} |",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    if not args.smoke and out.parent.exists():
        previous = out.read_text() if out.exists() else "# Engine benchmark results\n\n"
        out.write_text(previous.rstrip() + "\n\n" + report)


if __name__ == "__main__":
    main()
