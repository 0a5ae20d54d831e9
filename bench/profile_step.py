"""Where a step's time goes, at the real Qwen3-VL-8B shape (random bf16 weights): GPU work vs host work.

    python bench/profile_step.py [--batches 1 8 32 64] [--ctx 2048]

1. GPU time of one captured decode step per batch size (graph replays, synchronised), with the
   layer ops compiled and plain, against which the engine's measured inter-token time shows the
   host's share;
2. the engine's own step, split into schedule / model (graph or eager forward, synchronised) /
   sample / advance (detokenize, events), averaged over real decode steps at each batch size;
3. the same split for a turn-2 step (a short prefill on a cached 1080p prefix).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch
from common import REAL, SMOKE, build, image_message, sync_time
from concurrency_bench import picture

from chat.engine.local import engine as engine_module
from chat.engine.local.engine import Engine
from chat.engine.local.graphs import DecodeGraphs
from chat.engine.local.layer_ops import Ops
from chat.engine.local.runner import Runner
from chat.engine.types import ChatRequest, GenParams

PHASES: dict[str, list[float]] = defaultdict(list)


def instrument() -> None:
    """Time the engine step's phases (each closed by a device sync where the GPU is involved)."""
    schedule = engine_module.Scheduler.schedule
    sample = engine_module.sample
    advance = Engine._advance

    def timed_schedule(self):
        t = time.perf_counter()
        out = schedule(self)
        PHASES["schedule"].append(time.perf_counter() - t)
        PHASES["_model_start"].append(time.perf_counter())
        return out

    def timed_sample(*args):
        t = sync_time()
        PHASES["model"].append(t - PHASES["_model_start"][-1])
        out = sample(*args)
        PHASES["sample"].append(time.perf_counter() - t)
        PHASES["_advance_start"].append(time.perf_counter())
        return out

    def timed_advance(self, seq, token, metrics):
        t = time.perf_counter()
        out = advance(self, seq, token, metrics)
        PHASES["advance_row"].append(time.perf_counter() - t)
        return out

    engine_module.Scheduler.schedule = timed_schedule
    engine_module.sample = timed_sample
    Engine._advance = timed_advance


def replay_ms(graphs: DecodeGraphs, b: int, ctx: int, n: int = 30) -> float:
    """Synchronised time of one replay with every row reading `ctx` tokens of (garbage) KV."""
    blocks = -(-ctx // graphs.kv.block_size)
    graphs.seq_lens[:b].fill_(ctx)
    ids = torch.arange(b * blocks, dtype=torch.int32, device=graphs.tables.device).view(b, blocks)
    graphs.tables[:b, :blocks] = ids % (graphs.kv.k.shape[1] - 1) + 1
    graphs.slots[:b].zero_()
    for _ in range(3):
        graphs.graphs[(b, False)].replay()
    t = sync_time()
    for _ in range(n):
        graphs.graphs[(b, False)].replay()
    ms = (sync_time() - t) / n * 1e3
    graphs._reset(0)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--json", default="")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    model, processor, _ = build(device, SMOKE if args.smoke else REAL)
    images = {}
    eng = Engine(Runner(model, processor), images.__getitem__, max_waiting=512, max_context=8192,
                 max_batch_tokens=1024, max_running=128, max_running_per_owner=128)
    eng.start(warmup=True)
    eng.warmed.wait()
    assert eng.ready.is_set(), eng.warmup_error
    out: dict = {"graph_ms": {}}
    if device == "cuda":
        max_blocks = -(-eng.max_context // eng.pool.block_size)
        for compiled in (True, False):
            eng.step_runner.ops = Ops(compiled)
            graphs = DecodeGraphs(eng.step_runner, max(args.batches), max_blocks)
            graphs.capture()
            out["graph_ms"]["compiled" if compiled else "plain"] = {b: replay_ms(graphs, b, args.ctx)
                                                                    for b in args.batches}
            del graphs
            torch.cuda.empty_cache()
        print(json.dumps(out), flush=True)
    instrument()
    out["engine"] = {}
    for b in args.batches:
        PHASES.clear()
        prompt = "x" * (args.ctx - 40)
        handles = [eng.submit(ChatRequest([{"role": "user", "content": prompt}], GenParams(temperature=0.0,
                                                                                         max_new_tokens=64),
                                          cache_salt=f"p{b}-{i}")) for i in range(b)]
        for h in handles:
            h.wait()
        steps = [m for m in PHASES["model"][-40:]]
        out["engine"][b] = {
            "schedule_ms": statistics.median(PHASES["schedule"][-40:]) * 1e3,
            "model_ms": statistics.median(steps) * 1e3,
            "sample_ms": statistics.median(PHASES["sample"][-40:]) * 1e3,
            "advance_per_row_ms": statistics.median(PHASES["advance_row"]) * 1e3,
        }
        print(b, json.dumps(out["engine"][b]), flush=True)
    # Turn 2 on a cached 1080p prefix: one short mixed step, with the layer ops compiled and plain,
    # and once under the profiler (the top host-side ops say where an eager step's time goes).
    out["turn2"] = {}
    compiled_ops = eng.step_runner.ops
    for k, mode in enumerate(("compiled", "plain", "profiled")):
        images[f"t2-{k}"] = picture(1920, 1080, 5 + k)
        first = [image_message(f"t2-{k}")]
        owner = f"t2-{k}"
        done = eng.submit(ChatRequest(first, GenParams(temperature=0.0, max_new_tokens=32), cache_salt=owner)).wait()
        eng.step_runner.ops = Ops(False) if mode == "plain" else compiled_ops
        msgs = first + [{"role": "assistant", "content": done.text}, {"role": "user", "content": "And then?"}]
        PHASES.clear()
        t0 = time.perf_counter()
        if mode == "profiled":  # pack and forward timed apart, and the same forward run twice more
            from chat.engine.local import step as step_module

            forward, pack = step_module.ModelStep.forward, engine_module.pack
            seen = {}

            def timed_pack(*a, pack=pack, seen=seen):
                t = sync_time()
                out = pack(*a)
                seen["pack_ms"] = (sync_time() - t) * 1e3
                return out

            def timed_forward(self, batch, forward=forward, seen=seen):
                runs = []
                for _ in range(3):
                    t = sync_time()
                    out = forward(self, batch)
                    runs.append((sync_time() - t) * 1e3)
                seen["forward_ms_first_then_again"] = runs
                return out

            engine_module.pack, step_module.ModelStep.forward = timed_pack, timed_forward
            try:
                eng.submit(ChatRequest(msgs, GenParams(temperature=0.0, max_new_tokens=1), cache_salt=owner)).wait()
            finally:
                engine_module.pack, step_module.ModelStep.forward = pack, forward
            print(json.dumps(seen), flush=True)
            out["turn2_split"] = seen
        else:
            eng.submit(ChatRequest(msgs, GenParams(temperature=0.0, max_new_tokens=1), cache_salt=owner)).wait()
        out["turn2"][mode] = {"total_ms": (time.perf_counter() - t0) * 1e3,
                              **{k2: v[0] * 1e3 for k2, v in PHASES.items() if not k2.startswith("_") and v}}
        print(mode, json.dumps(out["turn2"][mode]), flush=True)
    eng.step_runner.ops = compiled_ops
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    eng.shutdown()


if __name__ == "__main__":
    main()
