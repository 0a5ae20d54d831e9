// vlchat page script (put into <head> by app.py through chat.page.mount_options).
// Chat messages arrive as HTML rendered on the server with raw HTML escaped (chat/render.py), and
// Gradio's Chatbot shows them with render_markdown=False. Two of its features read the raw value,
// that is the markup; these handlers give them the text a person sees instead.
(() => {
  // The message's text, without the answer's Details disclosure (its token counts and timing).
  const textOf = (row) =>
    Array.from(row.querySelectorAll(".message-content"))
      .map((m) => {
        const copy = m.cloneNode(true);
        copy.querySelectorAll(".vl-stats").forEach((n) => n.remove());
        m.parentNode.insertBefore(copy, m.nextSibling); // innerText needs it laid out
        const text = copy.innerText.trim();
        copy.remove();
        return text;
      })
      .filter(Boolean)
      .join("\n\n");

  // The per-message Copy button copies what is shown, not its HTML.
  document.addEventListener(
    "click",
    (event) => {
      const button = event.target.closest && event.target.closest("#chat button[aria-label='Copy message']");
      if (!button || !navigator.clipboard) return;
      let row = button.closest(".message-buttons-right, .message-buttons-left, .message-buttons");
      row = row && row.previousElementSibling;
      while (row && !row.classList.contains("message-row")) row = row.previousElementSibling;
      if (!row) return;
      event.stopImmediatePropagation();
      event.preventDefault();
      navigator.clipboard.writeText(textOf(row)).catch(() => {});
    },
    true,
  );

  // Each message's aria-label ("user's message: ...") is read instead of its content: make it the text.
  const relabel = (el) => {
    const label = el.getAttribute("aria-label") || "";
    const colon = label.indexOf(": ");
    if (colon < 0) return;
    const text = el.innerText.trim().slice(0, 1000);
    const wanted = label.slice(0, colon + 2) + text;
    if (text && label !== wanted) el.setAttribute("aria-label", wanted); // equal: no new mutation, no loop
  };
  const watch = () => {
    const chat = document.getElementById("chat");
    if (!chat) return false;
    const scan = () => chat.querySelectorAll("[data-testid='user'], [data-testid='bot']").forEach(relabel);
    new MutationObserver(scan).observe(chat, {
      subtree: true,
      childList: true,
      characterData: true,
      attributes: true,
      attributeFilter: ["aria-label"],
    });
    scan();
    return true;
  };
  const start = () => {
    if (!watch()) setTimeout(start, 200);
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
