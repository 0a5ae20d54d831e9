// vlchat theme choice (issue 13, ux), put into <head> by chat.page.mount_options: Light, Dark or System (the
// default: the system's setting, or Gradio's ?__theme=), kept in this browser (localStorage "vlchat.theme");
// a select in the Display group (#vl-display, built by prefs.js).
// Gradio's dark mode is the class "dark" on <body>; a saved choice is applied, and kept applied.
// No eval, no inline handlers: everything is wired with addEventListener.
(() => {
  const KEY = "vlchat.theme";
  const CHOICES = ["system", "light", "dark"];
  const t = (key, fallback) => (window.vlchat && window.vlchat.t ? window.vlchat.t(key) : fallback);
  const store = {
    get() {
      try {
        return window.localStorage.getItem(KEY);
      } catch (e) {
        return null;
      }
    },
    set(value) {
      try {
        window.localStorage.setItem(KEY, value);
      } catch (e) {
        /* private mode: the choice lasts for this page */
      }
    },
  };
  const choice = () => (CHOICES.includes(store.get()) ? store.get() : "system");
  const systemDark = () => !!(window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches);

  // -- the theme ----------------------------------------------------------------------------
  // Applied only when it differs (the observer below sees its own change and must not loop). With "system"
  // and no change by the person, Gradio's own choice (?__theme=, the system's) is left alone.
  let touched = false;
  const apply = () => {
    const body = document.body;
    if (!body) return;
    const wanted = choice();
    if (wanted === "system" && !touched) return;
    const dark = wanted === "dark" || (wanted === "system" && systemDark());
    if (body.classList.contains("dark") !== dark) body.classList.toggle("dark", dark);
  };
  const field = () => {
    const wrap = document.createElement("span");
    wrap.className = "vl-theme-field";
    const label = document.createElement("label");
    label.htmlFor = "vl-theme";
    label.textContent = t("theme.label", "Theme");
    const select = document.createElement("select");
    select.id = "vl-theme";
    for (const [value, key, text] of [["system", "theme.system", "System"], ["light", "theme.light", "Light"],
      ["dark", "theme.dark", "Dark"]]) {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = t(key, text);
      select.appendChild(option);
    }
    select.value = choice();
    select.addEventListener("change", () => {
      store.set(select.value);
      touched = true;
      apply();
    });
    wrap.append(label, select);
    return wrap;
  };
  const addField = () => {
    const display = document.getElementById("vl-display");
    if (!display) return false;
    if (!document.getElementById("vl-theme")) display.appendChild(field());
    return true;
  };

  // -- start ----------------------------------------------------------------------------------
  const check = window.vlchat.perFrame(() => {
    apply();
    addField();
  });
  const start = () => {
    if (!document.body) return setTimeout(start, 50);
    touched = choice() !== "system";
    new MutationObserver(check).observe(document.body, { subtree: true, childList: true, attributes: true,
      attributeFilter: ["class", "style", "hidden"] });
    check();
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
  if (window.matchMedia) {
    const query = window.matchMedia("(prefers-color-scheme: dark)");
    if (query.addEventListener) query.addEventListener("change", apply);
  }
  window.vlchat = Object.assign(window.vlchat || {}, { theme: choice });
})();
