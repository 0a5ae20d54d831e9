"""Issue 14, smaller GPUs: --quantize (bitsandbytes) and offloaded weights, run on the CPU with the tiny model.

bitsandbytes has a CPU path, so the quantized layers really run here; accelerate offloads to disk on a CPU
the same way --max-gpu-memory offloads to CPU memory on a GPU (its hooks bring each layer's weights in).
The speed and memory they cost on a GPU are in bench/RESULTS.md.
"""

from __future__ import annotations

import pytest

from chat.config import load_settings
from chat.engine.local.engine import Engine
from chat.engine.local.loader import ModelLoadError, load, placement
from chat.engine.local.runner import Runner
from chat.engine.types import Done
from tests.engine_helpers import IMAGES, request, user

QUESTION = [user("What is in this picture?", "fractal")]


def answer_with(loaded, messages=QUESTION, max_new_tokens=10) -> Done:
    eng = Engine(Runner(loaded.model, loaded.processor), IMAGES.__getitem__, max_waiting=2)
    eng.start(warmup=True)
    try:
        assert eng.ready.wait(60), eng.warmup_error
        done = eng.submit(request(messages, max_new_tokens=max_new_tokens)).wait(120)
        assert isinstance(done, Done), done
        return done
    finally:
        eng.shutdown()


@pytest.mark.parametrize("kind, layer_class", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_quantized_model_answers(model_dir, loaded, kind, layer_class):
    q = load("tiny-random", model_dir, "cpu", quantize=kind)
    layer = q.model.model.language_model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == layer_class
    assert type(layer.mlp.down_proj).__name__ == layer_class
    # The vision encoder and lm_head keep their precision (reading text in screenshots depends on them).
    assert type(q.model.lm_head).__name__ == "Linear"
    assert not any(type(m).__name__ == layer_class for m in q.model.model.visual.modules())
    done = answer_with(q)
    assert done.usage.completion_tokens == 10
    # The step ran the quantized modules (no fused float copies of the weights were made).
    assert q.model.model.language_model.layers[0].self_attn.q_proj.weight.dtype != loaded.model.dtype


def test_offloaded_weights_answer_like_the_whole_model(model_dir, loaded, tmp_path):
    whole = answer_with(loaded)
    small = load("tiny-random", model_dir, "cpu", max_memory={"cpu": "800KB"})
    hooked = [layer for layer in small.model.model.language_model.layers if hasattr(layer, "_hf_hook")]
    assert hooked, "accelerate offloaded nothing: the budget is too large for the test to mean anything"
    assert any(p.device.type == "meta" for p in small.model.parameters())
    assert answer_with(small).text == whole.text


def test_max_gpu_memory_needs_a_gpu_and_says_so():
    import torch

    with pytest.raises(ModelLoadError, match="--max-gpu-memory"):
        placement(torch.device("cpu"), "10GiB")
    assert placement(torch.device("cuda", 0), "10GiB") == {"device_map": "auto",
                                                           "max_memory": {0: "10GiB", "cpu": "1024GiB"}}


def test_settings_check_the_values():
    assert load_settings(["--quantize", "nf4", "--max-gpu-memory", "10GiB"], {}).quantize == "nf4"
    for argv, says in ((["--quantize", "fp8"], "int8 or nf4"), (["--max-gpu-memory", "lots"], "10GiB")):
        with pytest.raises(Exception, match=says):
            load_settings(argv, {}, exit_on_error=False)
