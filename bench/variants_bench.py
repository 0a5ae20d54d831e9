"""GPU benchmark of issue 14's engine variants at the real Qwen3-VL-8B shape (random weights, no download).

    python bench/variants_bench.py lora [--json OUT]         # base vs LoRA adapters loaded / in use
    python bench/variants_bench.py quant --folder DIR [...]  # bf16 vs --quantize int8/nf4 vs --max-gpu-memory

`lora`: the bf16 model with no adapters, then with 4 random rank-16 adapters on every projection
(q/k/v/o/gate/up/down of all 36 layers): decode tokens/s at batch 1 and 8 with base requests, with
every request on an adapter (a mix of the 4), and a mixed batch (half base, half adapters).

`quant`: the random model is saved once to DIR (safetensors), then loaded through vlchat's own
loader (`load(..., quantize=..., max_gpu_memory=...)`, the path `--quantize` and `--max-gpu-memory`
take): weights memory after loading, batch-1 and batch-8 decode tokens/s, turn-1 TTFT of a 720p image.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from common import REAL, SMOKE, build, png_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat.engine.local.engine import Engine  # noqa: E402
from chat.engine.local.lora import GROUPS, Adapter, LoraSet, module_of  # noqa: E402
from chat.engine.local.runner import Runner  # noqa: E402
from chat.engine.types import ChatRequest, Done, GenParams  # noqa: E402
from chat.images import open_clean  # noqa: E402

TEXT = "Write a long story about a lighthouse keeper who finds a message in a bottle. " * 4


def engine_for(model, processor, lora=None, images=None) -> Engine:
    eng = Engine(Runner(model, processor), (images or {}).__getitem__, max_waiting=64, max_running=64, lora=lora)
    eng.start(warmup=True)
    eng.warmed.wait()
    if eng.warmup_error:
        raise RuntimeError(eng.warmup_error)
    return eng


TIMES: dict[int, list[float]] = {}  # id(request) -> when each of its tokens was sampled (inside the engine)
KEEP: list = []
_advance = Engine._advance


def _recording_advance(self, seq, token, metrics):
    TIMES.setdefault(id(seq.request), []).append(time.perf_counter())
    return _advance(self, seq, token, metrics)


Engine._advance = _recording_advance


def timed(eng: Engine, requests: list[ChatRequest]) -> dict:
    """Submit all at once and wait; total tokens/s from the first token to the last, TTFT of the first."""
    KEEP.extend(requests)  # alive to the end: no two requests ever share an id()
    start = time.perf_counter()
    handles = [eng.submit(r) for r in requests]
    for h in handles:
        assert isinstance(h.wait(600), Done), h.result
    stamps = [TIMES[id(r)] for r in requests]
    first, last = min(t[0] for t in stamps), max(t[-1] for t in stamps)
    tokens = sum(len(t) for t in stamps)
    total = (tokens - len(requests)) / (last - first) if last > first else float("nan")
    return {"n": len(requests), "tokens": tokens, "total_tok_s": round(total, 1),
            "per_user_tok_s": round(total / len(requests), 1), "ttft_ms": round((first - start) * 1000, 1)}


def text_requests(n: int, tokens: int, adapters: list[str], tag: str) -> list[ChatRequest]:
    return [ChatRequest([{"role": "user", "content": f"{tag} {i}: {TEXT}"}],
                        GenParams(temperature=0.0, max_new_tokens=tokens), cache_salt=f"{tag}-{i}",
                        adapter=adapters[i % len(adapters)]) for i in range(n)]


def random_adapters(model, n: int, rank: int) -> LoraSet:
    layers = list(model.model.language_model.layers)
    g = torch.Generator().manual_seed(1)
    adapters = []
    for k in range(n):
        weights, scales = {}, {}
        for i, layer in enumerate(layers):
            for mods in GROUPS.values():
                for name in mods:
                    lin = module_of(layer, name)
                    weights[(i, name)] = (torch.randn(rank, lin.in_features, generator=g) * 0.01,
                                          torch.randn(lin.out_features, rank, generator=g) * 0.01)
                    scales[(i, name)] = 2.0
        adapters.append(Adapter(f"a{k}", "random", weights, scales, rank))
    weight = model.get_input_embeddings().weight
    return LoraSet(adapters, layers, weight.dtype, weight.device)


def lora_bench(args) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor, _ = build(dev, REAL if not args.smoke else SMOKE)
    out = {}
    eng = engine_for(model, processor)
    out["no adapters loaded"] = {b: timed(eng, text_requests(b, args.tokens, [""], f"base{b}")) for b in (1, 8)}
    eng.shutdown()
    lora = random_adapters(model, 4, 16)
    eng = engine_for(model, processor, lora)
    names = list(lora.names)
    out["4 adapters loaded, base requests"] = {b: timed(eng, text_requests(b, args.tokens, [""], f"lb{b}"))
                                               for b in (1, 8)}
    out["4 adapters loaded, every request on one"] = {b: timed(eng, text_requests(b, args.tokens, names, f"la{b}"))
                                                      for b in (1, 8)}
    out["4 adapters loaded, half base half adapters"] = {
        8: timed(eng, text_requests(8, args.tokens, ["", names[0], "", names[1]], "mix"))}
    out["graphs"] = eng.graphs.sizes if eng.graphs else None
    eng.shutdown()
    return out


def quant_bench(args) -> dict:
    from chat.engine.local.loader import load

    folder = Path(args.folder)
    if not (folder / "config.json").exists():
        model, processor, _ = build("cuda", REAL if not args.smoke else SMOKE)
        started = time.perf_counter()
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        print(f"saved the random model in {time.perf_counter() - started:.0f} s", flush=True)
        del model
        torch.cuda.empty_cache()
    image = png_bytes(1280, 720, 3)
    out = {}
    for label, kw in args.variants:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        started = time.perf_counter()
        loaded = load(str(folder), folder.parent, "cuda", **kw)
        loaded.model.generation_config.eos_token_id = None
        load_s = time.perf_counter() - started
        weights = torch.cuda.memory_allocated() - before
        eng = engine_for(loaded.model, loaded.processor, images={"img": open_clean(image)})
        row = {"load_s": round(load_s, 1), "weights_gib": round(weights / 2**30, 2),
               "graphs": bool(eng.graphs and eng.graphs.graphs)}
        row["decode"] = {b: timed(eng, text_requests(b, args.tokens, [""], f"{label}{b}")) for b in (1, 8)}
        turn1 = [ChatRequest([{"role": "user", "content": [{"type": "image", "image_id": "img"},
                                                           {"type": "text", "text": "Describe it."}]}],
                             GenParams(temperature=0.0, max_new_tokens=8), cache_salt=f"{label}-img-{k}")
                 for k in range(3)]
        row["turn1_720p_ttft_ms"] = statistics.median(timed(eng, [r])["ttft_ms"] for r in turn1)
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        eng.shutdown()
        del eng, loaded
        torch.cuda.empty_cache()
        out[label] = row
        print(label, json.dumps(row), flush=True)
    return out


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["lora", "quant"])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--folder", default="/tmp/qwen3vl-8b-random")
    ap.add_argument("--only", nargs="*", default=["bf16", "int8", "nf4", "offload"])
    ap.add_argument("--json", default="")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    choices = {"bf16": {}, "int8": {"quantize": "int8"}, "nf4": {"quantize": "nf4"},
               "offload": {"max_gpu_memory": "10GiB"}}
    args.variants = [(k, choices[k]) for k in args.only]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"gpu": gpu, "torch": torch.__version__, "when": time.strftime("%FT%H:%MZ"),
              args.what: lora_bench(args) if args.what == "lora" else quant_bench(args)}
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
