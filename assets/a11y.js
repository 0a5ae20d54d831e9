// vlchat accessibility fixes on Gradio's markup (issue 11, "Structure"); put into <head> through
// chat.page.mount_options. Gradio renders the page, so names and roles it leaves out are added here and
// re-added whenever it re-renders (a MutationObserver; every change is made only when the value differs,
// so the observer does not loop).
(() => {
  const set = (el, name, value) => {
    if (el && el.getAttribute(name) !== value) el.setAttribute(name, value);
  };
  // Radio groups are <fieldset>s without a <legend>: name them by their visible label.
  // Radio groups' names: i18n.js keys (the page's language), English without it.
  const GROUPS = { mode: ["group.mode", "Mode"], detail: ["group.detail", "Image detail"],
    "conversation-list": ["group.conversations", "Conversations"] };
  const tr = ([key, english]) => (window.vlchat && window.vlchat.t ? window.vlchat.t(key) : english);

  // The answer that follows a user's message row (null when there is none yet).
  const answerAfter = (row) => {
    for (let next = row.nextElementSibling; next; next = next.nextElementSibling) {
      if (next.classList.contains("user-row")) return null;
      if (next.classList.contains("bot-row")) return next;
    }
    return null;
  };
  // An answer's first finished sentence (at most 150 characters), without the note under it.
  const firstSentence = (row) => {
    const content = row && row.querySelector(".message-content");
    if (!content) return "";
    let text = "";
    content.querySelectorAll("p, li, h1, h2, h3, h4, pre").forEach((block) => {
      if (!block.classList.contains("answer-note")) text += `${block.textContent} `;
    });
    const match = /^\s*(.+?[.!?])(?=\s)/s.exec(text.replace(/\s+/g, " "));
    if (!match) return "";
    const sentence = match[1].trim();
    return sentence.length > 150 ? `${sentence.slice(0, 149)}…` : sentence;
  };

  const fix = () => {
    document.documentElement.lang || set(document.documentElement, "lang", "en");
    // The history sidebar is the conversations navigation (Gradio puts it inside its <main>).
    const sidebar = document.querySelector(".sidebar");
    if (sidebar) {
      set(sidebar, "role", "navigation");
      set(sidebar, "aria-label", tr(GROUPS["conversation-list"]));
      // Gradio puts the sidebar inside its <main>: move it just before, so main holds the chat alone. It is
      // drawn fixed at the side, so the move changes nothing on screen, only the landmarks. Its new holder
      // has the class "contain", which Gradio's scoping puts before every rule of the page's own CSS.
      const main = sidebar.closest("main");
      if (main && main.parentElement) {
        const holder = document.createElement("div");
        holder.className = "contain vl-nav-holder";
        main.parentElement.insertBefore(holder, main);
        holder.appendChild(sidebar);
      }
    }
    for (const [id, name] of Object.entries(GROUPS)) {
      const group = document.getElementById(id);
      if (!group) continue;
      set(group, "role", "radiogroup");
      set(group, "aria-label", tr(name));
      // Gradio names each radio differently, so the arrow keys cannot move between them: one name a group.
      group.querySelectorAll("input[type=radio]").forEach((input) => set(input, "name", `vl-${id}`));
    }
    // The Settings accordion's button says whether it is open.
    const acc = document.querySelector("#settings > .label-wrap, #settings button.label-wrap");
    if (acc) {
      const content = document.querySelector("#settings [data-testid='accordion-content']");
      const open = !!content && getComputedStyle(content).display !== "none";
      set(acc, "aria-expanded", String(open));
    }
    // Images in the chat: Gradio drops the message's alt_text (the img gets alt=""), and wraps each one in
    // an unnamed button that opens it larger. Each image's text alternative is its file name (chat/render.py
    // lists the names under the images as .vl-file) and, once the answer has one, the answer's first
    // sentence: "street.jpg: A crossing with a green light." Without a name: "Attached image N".
    document.querySelectorAll("#chat .message-row.user-row").forEach((row) => {
      const names = Array.from(row.querySelectorAll(".vl-file")).map((n) => n.textContent.trim());
      const first = firstSentence(answerAfter(row));
      row.querySelectorAll(".image-container img, img.svelte-1jk6tax, .image-frame img").forEach((img, i) => {
        const name = names[i] || `Attached image ${i + 1}`;
        const alt = first ? `${name}: ${first}` : name;
        set(img, "alt", alt);
        const button = img.closest("button");
        if (button) set(button, "aria-label", `${alt} (open larger)`);
        // The image's message is named "a component of type image" by Gradio: name it by the image.
        const message = img.closest("[data-testid='user']");
        if (message) set(message, "aria-label", `user's message: image ${alt}`);
      });
    });
    // The message box's attachment thumbnails are list items with no list around them (and their container
    // holds the upload button too, so it cannot be the list): each becomes a named group instead.
    document.querySelectorAll("#input [role='listitem']").forEach((item, i) => {
      if (item.closest("[role='list']")) return;
      set(item, "role", "group");
      set(item, "aria-label", `Attached image ${i + 1}, not sent yet`);
    });
    // Any other image in the chat still without a text alternative.
    document.querySelectorAll("#chat img:not([alt]), #chat img[alt='']").forEach((img) => set(img, "alt", "Image"));
  };

  const schedule = window.vlchat.perFrame(fix);
  const start = () => {
    const root = document.querySelector("gradio-app") || document.body;
    if (!root) return setTimeout(start, 200);
    new MutationObserver(schedule).observe(root, { subtree: true, childList: true, attributes: true,
      attributeFilter: ["alt", "style", "class", "name"] });
    fix();
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
