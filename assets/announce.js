// vlchat announcements and read-aloud (put into <head> by chat.page.mount_options; issue 11).
//
// Announcements: one polite live region of our own (#vl-announcer) says each finished sentence of the
// answer being streamed once, then "Answer complete" (or "Stopped." / the error), and what the status
// line says. Gradio's own live regions in the chat (the message log, which re-reads the whole answer on
// every token, and its "common.complete" progress announcer) are turned off.
// Read aloud: the browser's speechSynthesis speaks the answer sentence by sentence as it arrives
// (auto-read, on by default in the scene-description mode), or the last answer on request.
// Settings live in localStorage. No eval, no inline handlers: everything is wired with addEventListener.
(() => {
  const KEY = {
    announce: "vlchat.announceAnswers",
    autoRead: (mode) => `vlchat.autoRead.${mode}`,
    rate: "vlchat.speechRate",
    voice: "vlchat.speechVoice",
  };
  const AUTO_READ_MODES = ["scene"]; // chat/conversation.py MODES: auto-read is on by default here
  const store = {
    get(key) {
      try {
        return window.localStorage.getItem(key);
      } catch (e) {
        return null;
      }
    },
    set(key, value) {
      try {
        window.localStorage.setItem(key, value);
      } catch (e) {
        /* private mode: the setting lasts for this page */
      }
    },
  };

  // -- sentences --------------------------------------------------------------------------
  // A sentence ends at . ! or ? followed by white space, or at a line break. `finished` are the
  // complete ones; `rest` is what may still grow (the unfinished last sentence).
  const split = (text) => {
    const finished = [];
    const end = /[.!?]+["'”’)\]]*(?=\s)|\n/g;
    let from = 0;
    let match;
    while ((match = end.exec(text)) !== null) {
      const stop = match.index + match[0].length;
      const sentence = text.slice(from, stop).trim();
      if (sentence) finished.push(sentence);
      from = stop;
    }
    return { finished, rest: text.slice(from) };
  };
  const sentencesOf = (text) => {
    const { finished, rest } = split(text);
    return rest.trim() ? [...finished, rest.trim()] : finished;
  };

  // -- the live region ----------------------------------------------------------------------
  const hide = (el) => {
    // Visually hidden but read (set through the CSSOM: no inline style attribute strings).
    Object.assign(el.style, {
      position: "absolute", width: "1px", height: "1px", margin: "-1px", padding: "0", border: "0",
      overflow: "hidden", clip: "rect(0 0 0 0)", clipPath: "inset(50%)", whiteSpace: "nowrap",
    });
  };
  let region = null;
  const ensureRegion = () => {
    if (region && region.isConnected) return region;
    region = document.createElement("div");
    region.id = "vl-announcer";
    region.setAttribute("role", "status");
    region.setAttribute("aria-live", "polite");
    region.setAttribute("aria-atomic", "false");
    region.setAttribute("aria-relevant", "additions");
    hide(region);
    document.body.appendChild(region);
    return region;
  };
  // Each announcement is a new line in the region (screen readers queue additions); old lines go.
  const announce = (text) => {
    const said = (text || "").trim();
    if (!said || level() === "off") return;
    const r = ensureRegion();
    const line = document.createElement("div");
    line.textContent = said;
    r.appendChild(line);
    while (r.childNodes.length > 20) r.removeChild(r.firstChild);
  };

  // -- speech -----------------------------------------------------------------------------
  const synth = () => window.speechSynthesis || null;
  const rate = () => {
    const value = parseFloat(store.get(KEY.rate));
    return value >= 0.5 && value <= 2 ? value : 1;
  };
  const voice = () => {
    const s = synth();
    const wanted = store.get(KEY.voice);
    if (!s || !wanted || typeof s.getVoices !== "function") return null;
    return s.getVoices().find((v) => v.voiceURI === wanted) || null;
  };
  const speak = (text) => {
    const s = synth();
    if (!s || !window.SpeechSynthesisUtterance || !text) return;
    const utterance = new window.SpeechSynthesisUtterance(text);
    utterance.rate = rate();
    const v = voice();
    if (v) {
      utterance.voice = v;
      utterance.lang = v.lang;
    } else {
      utterance.lang = document.documentElement.lang || "en";
    }
    s.speak(utterance);
  };
  const stopSpeaking = () => {
    const s = synth();
    if (s) s.cancel();
  };

  // -- settings ---------------------------------------------------------------------------
  const currentMode = () => {
    const checked = document.querySelector("#mode input[type=radio]:checked");
    return checked ? checked.value : "general";
  };
  // Announcement level: every sentence (default), only the status and the end of each answer, or nothing
  // (refusals are alerts and are said anyway). Before levels, the setting was a checkbox: "off" meant "end".
  const LEVELS = [
    ["sentences", "Every sentence"],
    ["end", "Only when an answer ends"],
    ["off", "Nothing"],
  ];
  const level = () => {
    const saved = store.get(KEY.announce);
    if (saved === "off") return "end";
    if (saved === "none") return "off";
    return saved === "end" ? "end" : "sentences";
  };
  const announceOn = () => level() === "sentences";
  const autoReadOn = () => {
    const mode = currentMode();
    const saved = store.get(KEY.autoRead(mode));
    return saved === null ? AUTO_READ_MODES.includes(mode) : saved === "on";
  };

  // -- the answer being streamed ------------------------------------------------------------
  const lastBot = () => {
    const bots = document.querySelectorAll("#chat [data-testid='bot']");
    return bots.length ? bots[bots.length - 1] : null;
  };
  // The answer's own text: without the note under it ("…", "⏹ Stopped.", "⚠ error").
  const answerText = (bot) => {
    if (!bot) return "";
    const content = bot.querySelector(".message-content") || bot;
    const copy = content.cloneNode(true);
    copy.querySelectorAll(".answer-note, button, svg").forEach((n) => n.remove());
    // innerText needs layout: read it from a hidden, attached copy of the message.
    const holder = document.createElement("div");
    hide(holder);
    holder.setAttribute("aria-hidden", "true");
    holder.appendChild(copy);
    document.body.appendChild(holder);
    const text = copy.innerText;
    holder.remove();
    return text;
  };
  const noteOf = (bot) => {
    const note = bot && bot.querySelector(".answer-note");
    return note ? note.innerText.trim() : "";
  };
  // Which note the answer has (chat/render.py marks it with a class, whatever the page's language).
  const noteKind = (bot) => {
    const note = bot && bot.querySelector(".answer-note");
    if (!note) return "";
    const kind = Array.from(note.classList).find((c) => c.startsWith("vl-note-"));
    if (kind) return kind.slice("vl-note-".length);
    const text = note.innerText.trim();
    if (text === "…") return "pending";
    if (/Stopped/.test(text)) return "stopped";
    return text.startsWith("⚠") ? "error" : "";
  };
  const t = (key, english) => (window.vlchat && window.vlchat.t ? window.vlchat.t(key) : english);

  let answer = null; // {bot, count, said, silenced}: the answer being streamed
  const statusText = () => {
    // The Markdown's text only: Gradio's progress tracker in the same block counts seconds.
    const el = document.querySelector("#status [data-testid='markdown']");
    return el ? el.innerText.trim() : "";
  };
  // The status line while an answer is on its way starts with "Answering" (in the page's language).
  const busy = (text) => {
    const word = t("answering", "Answering…").replace(/[….]+$/, "");
    return /^Answering/.test(text) || (!!word && text.startsWith(word));
  };

  const say = (sentences) => {
    sentences.forEach((sentence) => {
      if (announceOn()) announce(sentence);
      if (answer && !answer.silenced && autoReadOn()) speak(sentence);
    });
  };
  const progress = (final) => {
    if (!answer) return;
    const bot = lastBot();
    if (!bot) return;
    const count = document.querySelectorAll("#chat [data-testid='bot']").length;
    if (noteKind(bot) === "pending") {
      // The new answer's placeholder (a regenerated one replaces the old answer): start from here.
      Object.assign(answer, { count, said: 0 });
      return;
    }
    if (answer.count === null) answer.count = count;
    if (count !== answer.count) {
      answer = null; // another conversation took the view: nothing more to say
      return;
    }
    answer.bot = bot;
    const { finished, rest } = split(answerText(bot));
    const fresh = finished.slice(answer.said);
    answer.said += fresh.length;
    say(fresh);
    if (final && rest.trim()) {
      answer.said += 1;
      say([rest.trim()]);
    }
  };
  const finish = (status) => {
    if (!answer) return;
    progress(true);
    const note = noteOf(answer.bot || lastBot());
    const kind = noteKind(answer.bot || lastBot());
    let line = t("announce.complete", "Answer complete");
    if (kind === "stopped" || /^Stopped/.test(status)) line = t("announce.stopped", "Stopped.");
    else if (kind === "error" || kind === "interrupted" || kind === "filtered") line = note.replace(/^⚠\s*/, "");
    else if (status) line = `${line}. ${status}`;
    answer = null;
    announce(line); // the end is said even with sentence announcements off
  };

  // -- watching the page ------------------------------------------------------------------
  let lastStatus = "";
  let ending = null;
  // A status line that only counts on ("Loading the model, 43%") is said at most every 10 seconds.
  let lastSaid = { shape: "", at: 0 };
  const announceStatus = (text) => {
    const shape = text.replace(/\d+/g, "#");
    const now = Date.now();
    if (/\d/.test(text) && shape === lastSaid.shape && now - lastSaid.at < 10000) return;
    lastSaid = { shape, at: now };
    announce(text);
  };
  const onStatus = () => {
    const now = statusText();
    if (now === lastStatus) return;
    const before = lastStatus;
    lastStatus = now;
    if (busy(now)) {
      if (!busy(before)) {
        clearTimeout(ending);
        if (answer) finish("");
        answer = { bot: null, count: null, said: 0, silenced: false };
        announceStatus(now);
      } else {
        announceStatus(now); // while it waits: its place in the queue, or that the next message waits
      }
      return;
    }
    if (busy(before) && answer) {
      // The last update of the chat comes with this status: let it land, then say the rest.
      clearTimeout(ending);
      ending = setTimeout(() => finish(now), 150);
      return;
    }
    announceStatus(now);
  };
  const mute = () => {
    // Gradio's live regions in the chat: the log re-reads every token, the tracker says "common.complete".
    document.querySelectorAll("#chat [aria-live]:not([aria-live='off']), #status [aria-live]:not([aria-live='off'])")
      .forEach((el) => el.setAttribute("aria-live", "off"));
  };

  // -- the controls -----------------------------------------------------------------------
  const button = (id, text) => {
    const b = document.createElement("button");
    b.type = "button";
    b.id = id;
    b.textContent = text;
    b.className = "lg secondary sm";
    return b;
  };
  const labelled = (id, text, input) => {
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = text;
    input.id = id;
    const wrap = document.createElement("span");
    wrap.className = "vl-speech-field";
    if (input.type === "checkbox") wrap.append(input, label);
    else wrap.append(label, input);
    Object.assign(wrap.style, { display: "inline-flex", alignItems: "center", gap: "0.35rem" });
    return wrap;
  };
  const controls = () => {
    const group = document.createElement("div");
    group.id = "speech-controls";
    group.setAttribute("role", "group");
    group.setAttribute("aria-label", "Announcements and reading aloud");
    Object.assign(group.style, { display: "flex", flexWrap: "wrap", gap: "0.5rem 1rem", alignItems: "center" });

    const levelSelect = document.createElement("select");
    LEVELS.forEach(([value, text]) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = text;
      levelSelect.appendChild(option);
    });
    levelSelect.value = level();
    // Stored as "sentences" / "end" / "none" ("off" is the old checkbox's "end").
    levelSelect.addEventListener("change", () =>
      store.set(KEY.announce, levelSelect.value === "off" ? "none" : levelSelect.value));

    const autoBox = document.createElement("input");
    autoBox.type = "checkbox";
    autoBox.checked = autoReadOn();
    autoBox.addEventListener("change", () => {
      store.set(KEY.autoRead(currentMode()), autoBox.checked ? "on" : "off");
      if (!autoBox.checked) stopSpeaking();
    });
    document.addEventListener("change", (event) => {
      if (event.target.closest && event.target.closest("#mode")) autoBox.checked = autoReadOn();
    });

    const read = button("read-aloud", "Read the last answer");
    read.addEventListener("click", () => readLast());
    const quiet = button("stop-reading", "Stop reading");
    quiet.addEventListener("click", () => stopReading());

    const rateInput = document.createElement("input");
    rateInput.type = "range";
    rateInput.min = "0.5";
    rateInput.max = "2";
    rateInput.step = "0.1";
    rateInput.value = String(rate());
    rateInput.addEventListener("change", () => store.set(KEY.rate, rateInput.value));

    const voiceSelect = document.createElement("select");
    const fillVoices = () => {
      const s = synth();
      const voices = s && typeof s.getVoices === "function" ? s.getVoices() : [];
      const wanted = store.get(KEY.voice) || "";
      voiceSelect.replaceChildren();
      const fallback = document.createElement("option");
      fallback.value = "";
      fallback.textContent = "Default voice";
      voiceSelect.appendChild(fallback);
      voices.forEach((v) => {
        const option = document.createElement("option");
        option.value = v.voiceURI;
        option.textContent = `${v.name} (${v.lang})`;
        voiceSelect.appendChild(option);
      });
      voiceSelect.value = voices.some((v) => v.voiceURI === wanted) ? wanted : "";
    };
    fillVoices();
    const s = synth();
    if (s && typeof s.addEventListener === "function") s.addEventListener("voiceschanged", fillVoices);
    voiceSelect.addEventListener("change", () => store.set(KEY.voice, voiceSelect.value));

    group.append(
      labelled("announce-level", "Announce", levelSelect),
      labelled("auto-read", "Auto-read answers", autoBox),
      read,
      quiet,
      labelled("speech-rate", "Speech rate", rateInput),
      labelled("speech-voice", "Voice", voiceSelect),
    );
    if (!synth()) [autoBox, read, quiet, rateInput, voiceSelect].forEach((el) => (el.disabled = true));
    return group;
  };
  // A "Read aloud" button beside each answer's Copy button (Gradio re-renders the row: re-added each time).
  const addReadButtons = () => {
    document.querySelectorAll("#chat .message-row.bot-row").forEach((row, i) => {
      let buttons = row.nextElementSibling;
      while (buttons && !buttons.classList.contains("message-buttons") && !buttons.classList.contains("message-row")) {
        buttons = buttons.nextElementSibling;
      }
      const wrapper = buttons && buttons.classList.contains("message-buttons")
        ? buttons.querySelector(".icon-button-wrapper") : null;
      if (!wrapper || wrapper.querySelector(".vl-read-answer")) return;
      const b = button("", "Read aloud");
      b.removeAttribute("id");
      b.classList.add("vl-read-answer");
      b.setAttribute("aria-label", `Read aloud: answer ${i + 1}`);
      b.addEventListener("click", () => readMessage(row.querySelector("[data-testid='bot']") || row));
      wrapper.appendChild(b);
    });
  };

  const place = () => {
    if (document.getElementById("speech-controls")) return true;
    const stop = document.getElementById("stop");
    const row = stop && stop.parentElement;
    if (!row || !row.parentElement) return false;
    row.parentElement.insertBefore(controls(), row.nextSibling);
    return true;
  };

  const start = () => {
    const chat = document.getElementById("chat");
    const status = document.getElementById("status");
    if (!chat || !status || !place()) {
      setTimeout(start, 200);
      return;
    }
    ensureRegion();
    mute();
    lastStatus = statusText();
    new MutationObserver(() => {
      mute();
      progress(false);
      addReadButtons();
    }).observe(chat, { subtree: true, childList: true, characterData: true, attributes: true,
      attributeFilter: ["aria-live"] });
    new MutationObserver(() => {
      mute();
      onStatus();
    }).observe(status, { subtree: true, childList: true, characterData: true });
    // The page's Stop button also stops the speech.
    document.addEventListener(
      "click",
      (event) => {
        if (event.target.closest && event.target.closest("#stop")) {
          if (answer) answer.silenced = true;
          stopSpeaking();
        }
      },
      true,
    );
  };
  // For the other scripts (keys.js, camera.js): the same functions the controls use.
  const readLast = () => {
    stopSpeaking();
    sentencesOf(answerText(lastBot())).forEach(speak);
  };
  const stopReading = () => {
    if (answer) answer.silenced = true;
    stopSpeaking();
  };
  const readMessage = (el) => {
    stopSpeaking();
    sentencesOf(answerText(el)).forEach(speak);
  };
  window.vlchat = Object.assign(window.vlchat || {}, { announce, readLast, stopReading, readMessage });

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
