"""Issue 14: sampling defaults from the checkpoint's generation config (else Qwen3-VL's model card), the
frequency penalty, and top k / penalties on the API and the page."""

from __future__ import annotations

import json
import shutil

import gradio as gr
import openai
import pytest
import torch

from chat import sampling_panel, ui
from chat.config import Settings
from chat.engine.local.sampling import sample
from chat.engine.sampling_defaults import CARD, SamplingDefaults, from_generation_config, read_generation_config
from chat.engine.types import ChatRequest, GenParams
from chat.engine.wire import request_body
from tests.servers import Server, data_dir
from tests.test_ui import OWNER, Req, real_ctx

MSGS = [{"role": "user", "content": "Say something short."}]


def write_generation_config(folder, **values) -> None:
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, **values}))


# -- the defaults -----------------------------------------------------------------------------------


def test_the_model_cards_values_when_the_checkpoint_says_nothing(tmp_path):
    assert (CARD.temperature, CARD.top_p, CARD.top_k, CARD.presence_penalty, CARD.frequency_penalty) == (
        0.7, 0.8, 20, 1.5, 0.0)
    assert read_generation_config(str(tmp_path)) == CARD  # no generation_config.json at all
    write_generation_config(tmp_path, eos_token_id=[1, 2], pad_token_id=2)  # only token ids, as the tiny model's
    assert read_generation_config(str(tmp_path)) == CARD


def test_the_checkpoints_generation_config_wins_value_by_value(tmp_path):
    write_generation_config(tmp_path, do_sample=True, temperature=1.0, top_k=5, eos_token_id=[1, 2])
    found = read_generation_config(str(tmp_path))
    assert (found.temperature, found.top_k) == (1.0, 5)
    # What the file does not say comes from the card (presence penalty is no generation-config field).
    assert (found.top_p, found.presence_penalty, found.frequency_penalty) == (0.8, 1.5, 0.0)
    assert found.source == "generation_config.json"
    # do_sample false: greedy by default; nonsense values are ignored, not used.
    assert from_generation_config({"do_sample": False, "temperature": 0.6}).temperature == 0.0
    assert from_generation_config({"temperature": "hot", "top_k": -3, "top_p": 7}) == CARD


def test_the_loader_carries_the_defaults(loaded):
    assert loaded.sampling_defaults == CARD  # the tiny checkpoint's generation config names no sampling values


def test_clamp_params_fills_what_is_left_out_from_the_defaults(tmp_path):
    s = Settings(data_dir=tmp_path)
    p = s.clamp_params(None, None, None)
    assert (p.temperature, p.top_p, p.top_k, p.presence_penalty, p.frequency_penalty) == (0.7, 0.8, 20, 1.5, 0.0)
    mine = SamplingDefaults(temperature=0.3, top_p=0.5, top_k=3, presence_penalty=0.0, frequency_penalty=0.25)
    p = s.clamp_params(None, None, None, defaults=mine)
    assert (p.temperature, p.top_p, p.top_k, p.presence_penalty, p.frequency_penalty) == (0.3, 0.5, 3, 0.0, 0.25)
    # Given values win (0 included), and stay in bounds.
    p = s.clamp_params(0.0, 1.0, 10, defaults=mine, top_k=-1, presence_penalty=0, frequency_penalty=9)
    assert (p.temperature, p.top_p, p.top_k, p.presence_penalty, p.frequency_penalty) == (0.0, 1.0, 0, 0.0, 2.0)


# -- the sampler --------------------------------------------------------------------------------------


def test_frequency_penalty_counts_occurrences_and_presence_penalty_does_not():
    with torch.inference_mode():  # as the engine's forward hands them over
        logits = torch.tensor([[5.0, 4.0, 0.0]])
    said = [[0, 0]]  # token 0 twice already
    assert sample(logits.clone(), [GenParams(temperature=0.0)], said, [None]) == [0]
    # 0.6 per occurrence: 5 - 1.2 = 3.8 < 4 -> token 1; once only (presence): 5 - 0.6 = 4.4 -> still token 0.
    assert sample(logits.clone(), [GenParams(temperature=0.0, frequency_penalty=0.6)], said, [None]) == [1]
    assert sample(logits.clone(), [GenParams(temperature=0.0, presence_penalty=0.6)], said, [None]) == [0]
    # A negative penalty favours repeating.
    with torch.inference_mode():
        close = torch.tensor([[4.0, 5.0, 0.0]])
    assert sample(close.clone(), [GenParams(temperature=0.0, frequency_penalty=-1.0)], said, [None]) == [0]


def test_penalties_are_per_row_in_one_batch():
    with torch.inference_mode():
        logits = torch.tensor([[5.0, 4.0, 0.0]] * 3)
    params = [GenParams(temperature=0.0, frequency_penalty=0.6), GenParams(temperature=0.0),
              GenParams(temperature=0.0, presence_penalty=0.6, frequency_penalty=0.3)]
    # Row 0: 5 - 1.2 -> 1. Row 1: no penalty -> 0. Row 2: 5 - 0.6 - 0.3 = 4.1 with one occurrence -> 0.
    assert sample(logits.clone(), params, [[0, 0], [0, 0], [0, 2]], [None] * 3) == [1, 0, 0]


def test_counts_kept_between_steps_equal_counts_from_scratch():
    import random

    from chat.engine.local.sampling import _penalize

    rng = random.Random(3)
    vocab = 11
    answers = [[], [1, 1], [4]]  # the engine appends to the same lists step after step
    params = [GenParams(presence_penalty=0.5, frequency_penalty=0.25), GenParams(frequency_penalty=-0.5),
              GenParams(presence_penalty=1.5)]
    for step in range(12):
        if step == 6:
            del answers[1][:]  # an answer that shrank (never in the engine): counted again from scratch
        if step == 8:
            answers[2] = [4, 4, 9]  # a new list for a row: its own counts
        with torch.inference_mode():
            logits = torch.randn(3, vocab)
            got = logits.clone()
            _penalize(got, params, answers)
        for row, (p, tokens) in enumerate(zip(params, answers, strict=True)):
            expected = logits[row].clone()
            for token in set(tokens):
                expected[token] -= p.presence_penalty + p.frequency_penalty * tokens.count(token)
            assert torch.allclose(got[row], expected), (step, row)
        for tokens in answers:
            tokens.append(rng.randrange(vocab))


def test_the_remote_engine_passes_the_values_on():
    params = Settings().clamp_params(0.5, None, 8, top_k=7, presence_penalty=0.5, frequency_penalty=-0.5)
    body = request_body(ChatRequest([{"role": "user", "content": "hi"}], params), "m", "salt", lambda i: b"")
    assert (body["top_k"], body["presence_penalty"], body["frequency_penalty"], body["top_p"]) == (7, 0.5, -0.5, 0.8)


# -- the API ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def configured_server(tmp_path_factory, model_dir):
    """A server whose checkpoint's generation config says: top_k 1, temperature 2 (so its default is argmax)."""
    data = data_dir(tmp_path_factory, model_dir, "sampling")
    folder = data / "models" / "checkpoint"
    shutil.copytree(data / "models" / "tiny-random", folder)
    (folder / "vlchat-tiny.json").unlink()
    write_generation_config(folder, do_sample=True, temperature=2.0, top_k=1, top_p=1.0)
    srv = Server(data, "--model", str(folder)).start()
    yield srv
    srv.stop()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)


def ask(sdk, **extra) -> str:
    return sdk.chat.completions.create(model="checkpoint", max_tokens=16, messages=MSGS,
                                       **extra).choices[0].message.content


def test_a_request_that_names_no_values_gets_the_checkpoints(configured_server):
    log = configured_server.log.read_text()
    assert "sampling defaults (generation_config.json): temperature 2.0, top_p 1.0, top_k 1" in log
    sdk = client(configured_server.base)
    # top_k 1 from the checkpoint: whatever the seed, the default answer is the greedy one with the card's
    # presence penalty (1.5); a request that names its own values is not touched.
    greedy = ask(sdk, temperature=0, presence_penalty=1.5)
    assert ask(sdk, seed=1) == ask(sdk, seed=2) == greedy
    assert ask(sdk, temperature=0, presence_penalty=0) != greedy


def test_frequency_penalty_and_top_k_are_accepted_and_checked(configured_server):
    sdk = client(configured_server.base)
    plain = ask(sdk, temperature=0, presence_penalty=0, frequency_penalty=0)
    assert ask(sdk, temperature=0, presence_penalty=0, frequency_penalty=2.0) != plain
    assert ask(sdk, temperature=0, presence_penalty=0, frequency_penalty=-2.0) is not None
    for wrong in ({"frequency_penalty": 2.5}, {"frequency_penalty": -3}, {"frequency_penalty": "high"},
                  {"top_k": -5}, {"top_k": 0.5}):
        with pytest.raises(openai.BadRequestError) as info:
            sdk.chat.completions.create(model="checkpoint", max_tokens=4, messages=MSGS, extra_body=wrong)
        assert info.value.body["param"] == next(iter(wrong))
        if wrong.get("frequency_penalty") in (2.5, -3):
            assert "between -2 and 2" in info.value.body["message"]
    # The Responses API takes it too.
    answers = [sdk.responses.create(model="checkpoint", input="Say something short.", max_output_tokens=16,
                                    temperature=0, extra_body={"presence_penalty": 0, "frequency_penalty": f}
                                    ).output_text for f in (0.0, 2.0)]
    assert answers[0] == plain and answers[1] != plain


# -- the page -----------------------------------------------------------------------------------------


@pytest.fixture
def ctx(tmp_path, loaded):
    yield from real_ctx(tmp_path, loaded)


def test_the_page_sends_and_saves_top_k_and_penalties_and_brings_them_back(ctx):
    sent = []
    submit = ctx.engine.submit

    def watching(request, **kwargs):
        sent.append(request.params)
        return submit(request, **kwargs)

    ctx.engine.submit = watching
    updates = list(ui.send(ctx, None, {"text": "hello", "files": []}, "general", 0.0, 0.9, 16, "", "auto", Req(),
                           5, 0.4, 0.7))
    conv_id = updates[0][0]
    p = sent[-1]
    assert (p.top_k, p.presence_penalty, p.frequency_penalty, p.top_p) == (5, 0.4, 0.7, 0.9)
    rows = ctx.store.messages(OWNER, conv_id)
    for row in rows:
        assert {k: row["settings"][k] for k in sampling_panel.KEYS} == {
            "top_k": 5, "presence_penalty": 0.4, "frequency_penalty": 0.7}
    list(ui.regenerate(ctx, conv_id, "general", 0.0, 0.9, 16, "", Req(), 3, 0.0, -0.5))
    assert (sent[-1].top_k, sent[-1].presence_penalty, sent[-1].frequency_penalty) == (3, 0.0, -0.5)
    assert sampling_panel.restore(ctx, conv_id, Req()) == (3, 0.0, -0.5, "")  # the newest turn's (base model)
    # Not given (an older caller): the model's defaults, and nothing stored for them.
    list(ui.send(ctx, conv_id, {"text": "more", "files": []}, "general", 0.0, 0.9, 16, "", "auto", Req()))
    assert (sent[-1].top_k, sent[-1].presence_penalty, sent[-1].frequency_penalty) == (20, 1.5, 0.0)
    assert "top_k" not in ctx.store.messages(OWNER, conv_id)[-1]["settings"]
    assert all(o is gr.skip() or o == gr.skip() for o in sampling_panel.restore(ctx, None, Req()))


def test_the_panel_starts_at_the_models_defaults(ctx):
    assert sampling_panel.page_defaults(ctx)[:4] == (0.8, 20, 1.5, 0.0)
    ctx.engine.sampling_defaults = SamplingDefaults(top_p=0.95, top_k=40, presence_penalty=0.0)
    assert sampling_panel.page_defaults(ctx)[:4] == (0.95, 40, 0.0, 0.0)


def test_in_the_browser_the_panel_starts_at_the_checkpoints_defaults_and_its_values_are_kept(configured_server,
                                                                                             browser):
    import sqlite3

    from tests.test_e2e_browser import open_settings, send, set_setting, wait_idle, wait_ready

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        page.goto(configured_server.base + "/")
        wait_ready(page)
        open_settings(page)
        value = lambda elem: page.locator(f"#{elem} input[type=number]").input_value()  # noqa: E731
        page.wait_for_function("() => document.querySelector('#top-k input[type=number]').value === '1'")
        assert (value("top-p"), value("presence-penalty"), value("frequency-penalty")) == ("1", "1.5", "0")
        for elem, number in (("top-k", "7"), ("presence-penalty", "0.3"), ("frequency-penalty", "-0.2")):
            set_setting(page, elem, number)
        send(page, "Panel values, please")
        wait_idle(page)
        db = sqlite3.connect(f"file:{configured_server.data_dir / 'vlchat.db'}?mode=ro", uri=True)
        try:
            rows = db.execute("select m.settings from messages m join conversations c on c.id = m.conversation_id "
                              "where c.title like 'Panel values%'").fetchall()
        finally:
            db.close()
        assert rows and all({k: json.loads(s)[k] for k in sampling_panel.KEYS} == {
            "top_k": 7, "presence_penalty": 0.3, "frequency_penalty": -0.2} for (s,) in rows)
        # A fresh page starts at the defaults again; reopening the conversation brings its values back.
        page.reload()
        wait_ready(page)
        open_settings(page)
        page.wait_for_function("() => document.querySelector('#top-k input[type=number]').value === '1'")
        page.locator("#conversation-list label", has_text="Panel values").first.click()
        page.wait_for_function("() => document.querySelector('#top-k input[type=number]').value === '7'")
        assert (value("presence-penalty"), value("frequency-penalty")) == ("0.3", "-0.2")
    finally:
        context.close()
