"""Run by tests/test_triton_paths.py in a subprocess with TRITON_INTERPRET=1 (Triton's CPU interpreter).

Serves the same concurrent requests three ways on the tiny model: the torch paths, the Triton
varlen kernel for mixed steps, and the Triton decode step used by the CUDA graphs (run eagerly
here); prints each way's answers and first-token logits as JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat.engine.local.engine import Engine  # noqa: E402
from chat.engine.local.graphs import DecodeGraphs, TritonAttention  # noqa: E402
from chat.engine.local.loader import build_tiny_random, load  # noqa: E402
from chat.engine.local.runner import Runner  # noqa: E402
from tests.engine_helpers import IMAGES, recorded_logits, request, user  # noqa: E402

CASES = [[user("Hello there.")], [user("What is this?", "red")], [user("Compare these.", "fractal", "wide")],
         [{"role": "system", "content": "Be careful. " * 20}, user("Why?")]]


def serve(loaded, mode: str) -> dict:
    eng = Engine(Runner(loaded.model, loaded.processor), IMAGES.__getitem__, max_batch_tokens=48, max_running=8)
    step = eng.step_runner
    if mode in ("triton", "graphs"):
        step.attention = TritonAttention(eng.kv, step.layers[0].self_attn.scaling)
    if mode == "graphs":
        eng.graphs = DecodeGraphs(step, 8, -(-eng.max_context // eng.pool.block_size))
        eng.graphs.capture()
    eng.start(warmup=False)
    reqs = [request(m, owner=f"o{i}", max_new_tokens=10) for i, m in enumerate(CASES)]
    with recorded_logits() as seen:
        results = [eng.submit(r) for r in reqs]
        texts = [h.wait(600).text for h in results]
    eng.shutdown()
    return {"texts": texts, "logits": [[row.tolist() for row in seen[id(r)]] for r in reqs],
            "graph_steps": getattr(eng.graphs, "steps", 0)}


def main() -> None:
    data = Path(tempfile.mkdtemp())
    build_tiny_random(data / "models" / "tiny-random")
    loaded = load("tiny-random", data, "cpu")
    print(json.dumps({mode: serve(loaded, mode) for mode in ("torch", "triton", "graphs")}))


if __name__ == "__main__":
    main()
