// vlchat strings for the page's scripts (issue 13): English and Simplified Chinese. Put into <head> first by
// chat.page.mount_options, so every other script can call window.vlchat.t(key) (English where a key has no
// translation; the key itself when it is unknown).
//
// The language: the person's choice (Display -> Language: localStorage "vlchat.lang", and the cookie
// vlchat_lang, which the server reads for what it writes), else the browser's. With a choice, the browser's
// reported language is set to it before Gradio starts, so Gradio's labels and <html lang> follow it too.
// No eval, no inline handlers.

// window.vlchat.perFrame(fn): a function that runs `fn` at most once per animation frame however often it is
// called. The page's scripts watch the DOM with MutationObservers, which fire many times a frame while an
// answer streams. Set before anything else here, so a failure further down cannot take it from them.
window.vlchat = Object.assign(window.vlchat || {}, {
  perFrame: (fn) => {
    let queued = false;
    return () => {
      if (queued) return;
      queued = true;
      requestAnimationFrame(() => {
        queued = false;
        fn();
      });
    };
  },
});

(() => {
  const KEY = "vlchat.lang";
  const COOKIE = "vlchat_lang";
  const LANGS = ["en", "zh-CN"];
  const STRINGS = {
    en: {
      "language.label": "Language",
      "language.auto": "Browser's language",
      "language.en": "English",
      "language.zh-CN": "简体中文 (Simplified Chinese)",
      "theme.label": "Theme",
      "theme.system": "System",
      "theme.light": "Light",
      "theme.dark": "Dark",
      "display.label": "Display",
      "highContrast.label": "High contrast",
      "group.mode": "Mode",
      "group.detail": "Image detail",
      "group.conversations": "Conversations",
      "stats.summary": "Details",
      "stats.tokens": "Tokens",
      "stats.ttft": "Time to first token",
      "stats.rate": "Speed",
      "stats.cached": "Cached prompt tokens",
      "stats.images": "Images encoded",
      "announce.complete": "Answer complete",
      "announce.stopped": "Stopped.",
      "answering": "Answering…",
      "camera.take": "Take a photo",
      "shortcuts.title": "Keyboard shortcuts",
    },
    "zh-CN": {
      "language.label": "语言",
      "language.auto": "浏览器的语言",
      "language.en": "English (英语)",
      "language.zh-CN": "简体中文",
      "theme.label": "主题",
      "theme.system": "跟随系统",
      "theme.light": "浅色",
      "theme.dark": "深色",
      "display.label": "显示",
      "highContrast.label": "高对比度",
      "group.mode": "模式",
      "group.detail": "图片细节",
      "group.conversations": "对话",
      "stats.summary": "详情",
      "stats.tokens": "Token",
      "stats.ttft": "首个 token 用时",
      "stats.rate": "速度",
      "stats.cached": "缓存的提示 token",
      "stats.images": "编码的图片",
      "announce.complete": "回答完毕",
      "announce.stopped": "已停止。",
      "answering": "正在回答…",
      "camera.take": "拍照",
      "shortcuts.title": "键盘快捷键",
    },
  };
  const saved = () => {
    try {
      const value = window.localStorage.getItem(KEY);
      return LANGS.includes(value) ? value : null;
    } catch (e) {
      return null;
    }
  };
  const pick = (tag) => {
    const t = (tag || "").toLowerCase();
    if (t.startsWith("zh") && !/^zh-(tw|hk|mo|hant)/.test(t)) return "zh-CN";
    return t.startsWith("en") ? "en" : null;
  };
  const browserLang = () => {
    for (const tag of navigator.languages || [navigator.language]) {
      const found = pick(tag);
      if (found) return found;
    }
    return "en";
  };
  const chosen = saved();
  // Gradio picks its language from the browser's before this script runs (it mounts the page's head after
  // setting up its translations): a chosen language is handed to its own changeLocale, from the module it
  // loaded (the same URL is the same module instance).
  const useChosen = () => {
    const core = performance.getEntriesByType("resource").map((e) => e.name)
      .find((name) => /\/assets\/core-[\w-]+\.js$/.test(name));
    if (!core) return;
    import(core).then((m) => {
      if (typeof m.changeLocale === "function") m.changeLocale(chosen);
    }).catch(() => {});
  };
  if (chosen && pick(document.documentElement.lang) !== chosen) useChosen();
  const setCookie = (value) => {
    document.cookie = value
      ? `${COOKIE}=${value}; path=/; max-age=31536000; SameSite=Lax`
      : `${COOKIE}=; path=/; max-age=0; SameSite=Lax`;
  };
  // The server follows the same choice (and forgets a stale one).
  if ((document.cookie.match(/(?:^|;\s*)vlchat_lang=([^;]*)/) || [])[1] !== (chosen || undefined)) setCookie(chosen);

  const lang = () => chosen || pick(document.documentElement.lang) || browserLang();
  const t = (key) => {
    const table = STRINGS[lang()] || STRINGS.en;
    return table[key] || STRINGS.en[key] || key;
  };

  // The choice, in the Display group (#vl-display, built by prefs.js); a change reloads the page in it.
  const field = () => {
    const wrap = document.createElement("span");
    wrap.className = "vl-theme-field";
    const label = document.createElement("label");
    label.htmlFor = "vl-lang";
    label.textContent = t("language.label");
    const select = document.createElement("select");
    select.id = "vl-lang";
    for (const value of ["", ...LANGS]) {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = t(value ? `language.${value}` : "language.auto");
      if (value) option.lang = value;
      select.appendChild(option);
    }
    select.value = chosen || "";
    select.addEventListener("change", () => {
      try {
        if (select.value) window.localStorage.setItem(KEY, select.value);
        else window.localStorage.removeItem(KEY);
      } catch (e) {
        /* private mode */
      }
      setCookie(select.value);
      window.location.reload();
    });
    wrap.append(label, select);
    return wrap;
  };
  // An answer's details (chat/stats.py writes them in English): their words in the page's language.
  const STATS = { Details: "stats.summary", Tokens: "stats.tokens", "Time to first token": "stats.ttft",
    Speed: "stats.rate", "Cached prompt tokens": "stats.cached", "Images encoded": "stats.images" };
  const VALUES = {
    "zh-CN": [[/^([\d,]+) prompt, ([\d,]+) generated$/, "提示 $1，生成 $2"], [/^([\d.,]+) tokens\/s$/, "每秒 $1 个 token"]],
  };
  // The message box's placeholder, which the server sets in English when the model is ready (chat/ui.py).
  const PLACEHOLDERS = {
    "zh-CN": {
      "Ask about an image — Enter sends, Shift+Enter for a new line; paste or drop images":
        "询问图片相关的问题——Enter 发送，Shift+Enter 换行；可粘贴或拖入图片",
      "Starting…": "正在启动…",
    },
  };
  const translatePlaceholder = (current) => {
    const box = document.querySelector("#input textarea");
    const wanted = box && (PLACEHOLDERS[current] || {})[box.placeholder];
    if (wanted) box.placeholder = wanted;
  };
  const translateStats = () => {
    const current = lang();
    if (current === "en") return;
    translatePlaceholder(current);
    document.querySelectorAll("#chat .vl-stats summary, #chat .vl-stats dt, #chat .vl-stats dd").forEach((el) => {
      const text = el.textContent;
      let wanted = STATS[text] ? t(STATS[text]) : text;
      for (const [pattern, replacement] of VALUES[current] || []) wanted = wanted.replace(pattern, replacement);
      if (wanted !== text) el.textContent = wanted;
    });
  };
  const watch = window.vlchat.perFrame(translateStats);
  const start = () => {
    const display = document.getElementById("vl-display");
    if (!display) return setTimeout(start, 200);
    if (!document.getElementById("vl-lang")) display.appendChild(field());
    if (lang() !== "en") {
      new MutationObserver(watch).observe(document.body, { subtree: true, childList: true, attributes: true,
        attributeFilter: ["placeholder"] });
    }
    translateStats();
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
  // Whether a status line says an answer is on its way: it starts with "Answering" in English or in the page's
  // language (chat/stream.py writes it in the page's language, chat/i18n_catalog.py).
  const answering = (text) => {
    const word = t("answering").replace(/[….]+$/, "");
    return /^Answering/.test(text || "") || (!!word && (text || "").startsWith(word));
  };
  window.vlchat = Object.assign(window.vlchat || {}, { t, lang, answering });
})();
