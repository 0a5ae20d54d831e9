// vlchat accessibility fixes on Gradio's markup (issue 11, "Structure"); put into <head> through
// chat.page.mount_options. Gradio renders the page, so names and roles it leaves out are added here and
// re-added whenever it re-renders (a MutationObserver; every change is made only when the value differs,
// so the observer does not loop).
(() => {
  const set = (el, name, value) => {
    if (el && el.getAttribute(name) !== value) el.setAttribute(name, value);
  };
  // Radio groups are <fieldset>s without a <legend>: name them by their visible label.
  const GROUPS = { mode: "Mode", detail: "Image detail", "conversation-list": "Conversations" };

  const fix = () => {
    document.documentElement.lang || set(document.documentElement, "lang", "en");
    // The history sidebar is the conversations navigation (Gradio puts it inside its <main>).
    const sidebar = document.querySelector(".sidebar");
    if (sidebar) {
      set(sidebar, "role", "navigation");
      set(sidebar, "aria-label", "Conversations");
    }
    for (const [id, name] of Object.entries(GROUPS)) {
      const group = document.getElementById(id);
      if (!group) continue;
      set(group, "role", "radiogroup");
      set(group, "aria-label", name);
    }
    // The Settings accordion's button says whether it is open.
    const acc = document.querySelector("#settings > .label-wrap, #settings button.label-wrap");
    if (acc) {
      const content = document.querySelector("#settings [data-testid='accordion-content']");
      const open = !!content && getComputedStyle(content).display !== "none";
      set(acc, "aria-expanded", String(open));
    }
    // Images in the chat: Gradio drops the message's alt_text (the img gets alt=""), and wraps each one in
    // an unnamed button that opens it larger. Each gets "Attached image N" (N within its message, as
    // chat/render.py stores it) and its button says what it does.
    document.querySelectorAll("#chat .message-row, #chat [data-testid='user'], #chat [data-testid='bot']")
      .forEach((row) => {
        row.querySelectorAll(".image-container img, img.svelte-1jk6tax, .image-frame img").forEach((img, i) => {
          const label = img.getAttribute("alt") || `Attached image ${i + 1}`;
          if (!img.getAttribute("alt")) set(img, "alt", label);
          const button = img.closest("button");
          if (button && !button.getAttribute("aria-label")) set(button, "aria-label", `${label}: open larger`);
        });
      });
    // Any other image in the chat still without a text alternative.
    document.querySelectorAll("#chat img:not([alt]), #chat img[alt='']").forEach((img) => set(img, "alt", "Image"));
  };

  let queued = false;
  const schedule = () => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      fix();
    });
  };
  const start = () => {
    const root = document.querySelector("gradio-app") || document.body;
    if (!root) return setTimeout(start, 200);
    new MutationObserver(schedule).observe(root, { subtree: true, childList: true, attributes: true,
      attributeFilter: ["alt", "style", "class"] });
    fix();
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
