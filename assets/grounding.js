// Grounding (issue 14): an answer with boxes or points shows its image drawn with them (chat/grounding_page.py).
// Gradio drops a chat image's alt text, so the answer carries a caption (p.vl-grounding: "Boxes: cat, red car (2)")
// and this makes it the drawn image's text alternative, and the name of the button that opens it larger.
(() => {
  const set = (el, name, value) => {
    if (el.getAttribute(name) !== value) el.setAttribute(name, value);
  };
  const fix = () => {
    document.querySelectorAll("#chat .bot-row").forEach((row) => {
      const caption = row.querySelector(".vl-grounding");
      if (!caption) return;
      const alt = caption.textContent.trim();
      row.querySelectorAll("img").forEach((img) => {
        set(img, "alt", alt);
        const button = img.closest("button");
        if (button) set(button, "aria-label", `${alt} (open larger)`);
        const message = img.closest("[data-testid='bot']");
        if (message) set(message, "aria-label", `bot's message: drawn image, ${alt}`);
      });
    });
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
      attributeFilter: ["alt"] });
    fix();
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
