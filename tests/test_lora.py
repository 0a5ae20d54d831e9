"""Issue 14: LoRA adapters on the tiny model, served side by side in one batch.

The adapters are made with peft itself (random A and B, so they change the answers) and saved as
PEFT folders, as an operator's would be. The engine's output with an adapter is checked against
transformers running the same adapter merged into the weights.
"""

from __future__ import annotations

import types

import pytest
import torch

from chat.engine.adapters import LoraError, parse_specs
from chat.engine.local.engine import Engine
from chat.engine.local.loader import load
from chat.engine.local.lora import load_adapters
from chat.engine.local.runner import Runner
from chat.engine.types import ChatRequest, Done, GenParams, UnknownAdapter
from tests.engine_helpers import IMAGES, recorded_logits, reference_logits, user

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_dir, folder, seed: int, targets: list[str], rank: int = 4, pattern: str = "language_model"):
    """A PEFT LoRA adapter with random weights on a fresh copy of the tiny model, saved to `folder`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = load("tiny-random", model_dir, "cpu").model
    config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                        target_modules=rf".*{pattern}.*\.({'|'.join(targets)})")
    get_peft_model(base, config).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"alpha": make_adapter(model_dir, root / "alpha", 1, ALL),
            "beta": make_adapter(model_dir, root / "beta", 2, ["q_proj", "v_proj"], rank=2)}


@pytest.fixture(scope="module")
def engine(loaded, adapters):
    eng = Engine(Runner(loaded.model, loaded.processor), IMAGES.__getitem__, max_waiting=8,
                 lora=load_adapters(adapters, loaded.model))
    eng.start(warmup=True)
    assert eng.ready.wait(60)
    yield eng
    eng.shutdown()


def ask(eng, messages, adapter="", owner="o", **params) -> ChatRequest:
    return ChatRequest(messages, GenParams(**{"temperature": 0.0, "max_new_tokens": 12, **params}), cache_salt=owner,
                       adapter=adapter)


def answer(eng, messages, adapter="", owner="o") -> Done:
    done = eng.submit(ask(eng, messages, adapter, owner)).wait(120)
    assert isinstance(done, Done), done
    return done


def merged_reference(model_dir, path, messages):
    """Last-position logits from transformers' own forward with the adapter merged into the weights by peft."""
    from peft import PeftModel

    fresh = load("tiny-random", model_dir, "cpu")
    merged = PeftModel.from_pretrained(fresh.model, path).merge_and_unload()
    return reference_logits(types.SimpleNamespace(model=merged, processor=fresh.processor), messages)


@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_adapter_logits_match_transformers_with_the_adapter_merged(engine, model_dir, adapters, name):
    messages = [user("What is in this picture?", "fractal")]
    req = ask(engine, messages, name)
    with recorded_logits() as seen:
        assert isinstance(engine.submit(req).wait(120), Done)
    _, ref = merged_reference(model_dir, adapters[name], messages)
    _, base = reference_logits(types.SimpleNamespace(model=engine.runner.model, processor=engine.runner.processor),
                               messages)
    got = seen[id(req)][0]
    assert torch.allclose(got, ref.float(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, base.float(), atol=1e-3)  # the adapter really changed the model


def test_answers_differ_from_the_base_and_repeat_exactly(engine):
    messages = [user("Describe the colours.", "red")]
    base = answer(engine, messages).text
    alpha = answer(engine, messages, "alpha").text
    beta = answer(engine, messages, "beta").text
    assert len({base, alpha, beta}) == 3
    assert answer(engine, messages, "alpha").text == alpha
    assert answer(engine, messages).text == base


def test_mixed_batch_gives_each_request_its_own_answer(engine):
    """Base, alpha and beta requests in the same steps answer exactly as each does alone."""
    prompts = [[user(f"Question {i}: what shape is it?", "fractal")] for i in range(3)]
    names = ["", "alpha", "beta", "alpha", ""]
    alone = [answer(engine, prompts[i % 3], name, owner=f"solo{i}").text for i, name in enumerate(names)]
    handles = [engine.submit(ask(engine, prompts[i % 3], name, owner=f"mix{i}", max_new_tokens=12))
               for i, name in enumerate(names)]
    together = [h.wait(120).text for h in handles]
    assert together == alone


def test_prefix_cache_keys_on_the_adapter(engine):
    messages = [user("A long enough question to fill a block or two of the cache. " * 6)]
    answer(engine, messages, owner="same")
    first = answer(engine, messages, "alpha", owner="same")
    assert first.usage.cached_tokens == 0  # the base model's KV state is not the adapter's
    again = answer(engine, messages, "alpha", owner="same")
    assert again.usage.cached_tokens > 0


def test_unknown_adapter_is_refused(engine):
    with pytest.raises(UnknownAdapter, match="gamma.*alpha, beta"):
        engine.submit(ask(engine, [user("hi")], "gamma"))


def test_adapters_the_engine_cannot_apply_are_refused(loaded, model_dir, tmp_path):
    visual = make_adapter(model_dir, tmp_path / "visual", 3, ["qkv"], pattern="visual")
    with pytest.raises(LoraError, match="vision encoder"):
        load_adapters({"eyes": visual}, loaded.model)
    with pytest.raises(LoraError, match="could not be read"):
        load_adapters({"gone": str(tmp_path / "missing")}, loaded.model)


def test_specs_parse_with_clear_errors():
    assert parse_specs("med=/a/b, shop = org/adapter") == {"med": "/a/b", "shop": "org/adapter"}
    for bad, says in (("justapath", "NAME=PATH"), ("a=/x,a=/y", "twice"), ("bad name=/x", "letters")):
        with pytest.raises(LoraError, match=says):
            parse_specs(bad)


# -- the page: a selector (hidden without adapters), kept with the turn and the conversation --------------------


@pytest.fixture
def page_ctx(tmp_path, loaded, adapters):
    from chat import ui
    from chat.config import Settings
    from chat.images import open_clean
    from chat.store import Store

    store = Store(tmp_path / "data")
    settings = Settings(data_dir=tmp_path / "data", lora=",".join(f"{k}={v}" for k, v in adapters.items()))
    eng = Engine(Runner(loaded.model, loaded.processor), lambda i: open_clean(store.image_bytes(i)),
                 lora=load_adapters(adapters, loaded.model))
    eng.start(warmup=False)
    yield ui.Ctx(store=store, engine=eng, settings=settings, random_weights=True)
    eng.shutdown()
    store.close()


def test_the_page_sends_with_the_chosen_adapter_and_brings_it_back(page_ctx):
    from chat import sampling_panel, ui
    from chat.config import Settings
    from chat.notices import Notice
    from tests.test_ui import OWNER, Req

    choice = sampling_panel.adapter_choice(page_ctx)
    assert choice.visible and [v for _, v in choice.choices] == ["", "alpha", "beta"]
    hidden = sampling_panel.adapter_choice(types.SimpleNamespace(settings=Settings()))
    assert not hidden.visible

    def ask(text, conv_id=None, adapter=None):
        updates = list(ui.send(page_ctx, conv_id, {"text": text, "files": []}, "general", 0.0, 0.9, 16, "", "auto",
                               Req(), 0, 0.0, 0.0, adapter))
        return updates[0][0] or conv_id

    base_conv = ask("Name three colours.")
    alpha_conv = ask("Name three colours.", adapter="alpha")
    base, alpha = (page_ctx.store.messages(OWNER, c) for c in (base_conv, alpha_conv))
    assert alpha[0]["settings"]["adapter"] == "alpha" and "adapter" not in base[0]["settings"]
    assert base[-1]["text"] != alpha[-1]["text"]  # the adapter answered, not the base model
    assert sampling_panel.restore(page_ctx, alpha_conv, Req())[-1] == "alpha"
    assert sampling_panel.restore(page_ctx, base_conv, Req())[-1] == ""
    with pytest.raises(Notice, match="gamma"):
        ask("Hello", adapter="gamma")
