"""GPU check of the fast decode path on the tiny model: capture, replay, and agreement with the eager path.

    python bench/fast_check.py

Prints each stage as it goes (and a traceback of every thread if a stage hangs), so a failure
on the GPU box shows where it happened.
"""

from __future__ import annotations

import faulthandler
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
faulthandler.dump_traceback_later(90, exit=True)

from chat.engine.fastdecode import FastDecoder  # noqa: E402
from chat.engine.loader import load  # noqa: E402
from chat.engine.runner import Runner  # noqa: E402


def say(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


loaded = load("tiny-random", Path(tempfile.mkdtemp()))
say("loaded on", loaded.device)
runner = Runner(loaded.model, loaded.processor)
prompt_ids = loaded.processor.tokenizer("Hello there, describe things.", add_special_tokens=False)["input_ids"]
n = len(prompt_ids)
positions = torch.arange(n).expand(3, n)
kv = runner.new_cache()
logits = runner.forward(prompt_ids, positions, 0, kv)
say("prefill done", n)
eager, tok = [], int(logits.argmax(-1))
kv2 = runner.new_cache()
runner.forward(prompt_ids, positions, 0, kv2)
for i in range(12):
    eager.append(tok)
    logits2 = runner.forward([tok], torch.full((3, 1), n + i), n + i, kv2)
    tok = int(logits2.argmax(-1))
say("eager decode", eager)
for graphs in (False, True) if torch.cuda.is_available() else (False,):
    dec = FastDecoder(loaded.model, max_len=1024, use_graphs=graphs)
    say("decoder built, graphs =", graphs, "buckets", dec.buckets)
    if graphs:
        t0 = time.perf_counter()
        dec.warm_up()
        say(f"captured {len(dec.graphs)} graphs in {time.perf_counter() - t0:.2f} s")
    dec.load(kv, n)
    out, tok = [], int(logits.argmax(-1))
    for i in range(12):
        out.append(tok)
        tok = int(dec.step(tok, n + i, n + i, 0.0, 1.0).item())
    say("fast decode", out, "equal to eager:", out == eager)
faulthandler.cancel_dump_traceback_later()
say("ok")
