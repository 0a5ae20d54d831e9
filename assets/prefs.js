// vlchat choices kept in this browser (issue 11): the mode, and the high-contrast theme. Put into <head> by
// chat.page.mount_options. localStorage only (nothing goes to the server); no eval, no inline handlers.
//
// Mode: the mode a person picks is the one a new page starts in (a conversation they reopen still shows
// its own mode). High contrast: white on black with yellow controls (assets/a11y.css, class vl-hc on
// <html>); it follows the system's "more contrast" until the person sets it here.
(() => {
  const KEY = { mode: "vlchat.mode", contrast: "vlchat.highContrast" };
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
        /* private mode: the choice lasts for this page */
      }
    },
  };

  // -- high contrast ------------------------------------------------------------------------
  const systemMore = () => !!(window.matchMedia && window.matchMedia("(prefers-contrast: more)").matches);
  const highContrast = () => {
    const saved = store.get(KEY.contrast);
    return saved === null ? systemMore() : saved === "on";
  };
  const applyContrast = () => document.documentElement.classList.toggle("vl-hc", highContrast());
  applyContrast(); // before the first paint, so the page never flashes in the other colours

  const tr = (key, english) => (window.vlchat && window.vlchat.t ? window.vlchat.t(key) : english);
  const display = () => {
    const group = document.createElement("div");
    group.id = "vl-display";
    group.setAttribute("role", "group");
    group.setAttribute("aria-label", tr("display.label", "Display"));
    Object.assign(group.style, { display: "flex", flexWrap: "wrap", gap: "0.5rem 1rem", alignItems: "center" });
    const box = document.createElement("input");
    box.type = "checkbox";
    box.id = "high-contrast";
    box.checked = highContrast();
    box.addEventListener("change", () => {
      store.set(KEY.contrast, box.checked ? "on" : "off");
      applyContrast();
    });
    const label = document.createElement("label");
    label.htmlFor = box.id;
    label.textContent = tr("highContrast.label", "High contrast");
    const wrap = document.createElement("span");
    wrap.className = "vl-speech-field";
    Object.assign(wrap.style, { display: "inline-flex", alignItems: "center", gap: "0.35rem" });
    wrap.append(box, label);
    group.append(wrap);
    return group;
  };

  // -- mode ---------------------------------------------------------------------------------
  const radios = () => Array.from(document.querySelectorAll("#mode input[type=radio]"));
  // Only a person's choice is kept: Gradio sets the radio without a change event when a conversation opens.
  document.addEventListener("change", (event) => {
    const input = event.target;
    if (input && input.matches && input.matches("#mode input[type=radio]") && input.checked) {
      store.set(KEY.mode, input.value);
    }
  });
  const restoreMode = () => {
    const wanted = store.get(KEY.mode);
    const choice = radios().find((r) => r.value === wanted);
    // Once, on a fresh page: clicking goes through Gradio, which loads that mode's defaults into Settings.
    if (choice && !choice.checked) choice.click();
  };

  const start = () => {
    const speech = document.getElementById("speech-controls");
    const box = document.querySelector("#input textarea");
    if (!speech || !radios().length || !box) {
      setTimeout(start, 200);
      return;
    }
    if (!document.getElementById("vl-display")) speech.parentElement.insertBefore(display(), speech.nextSibling);
    restoreMode();
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
  if (window.matchMedia) {
    const query = window.matchMedia("(prefers-contrast: more)");
    if (query.addEventListener) query.addEventListener("change", applyContrast);
  }
  window.vlchat = Object.assign(window.vlchat || {}, { highContrast, applyContrast });
})();
