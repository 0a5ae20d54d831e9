// vlchat page behaviour for issue 13 (ux), put into <head> by chat.page.mount_options:
//  - Delete's inline confirmation (#delete-confirm, chat/page.py): when it opens, the focus moves to its
//    Cancel button and it is an alert dialog named by its question; Escape cancels; when it closes, the focus
//    goes back to Delete (Cancel) or to the message box (the conversation was deleted).
//  - The message box's send button turns into Stop while an answer streams (the status line says
//    "Answering…", as assets/announce.js reads it): <body> gets the class vl-answering, which assets/ux.css
//    uses to show the box's Stop button instead of its send button. The box stays editable (a message sent
//    meanwhile waits for the answer). If the focus was on Stop when the answer ends, it goes to the box.
// No eval, no inline handlers: everything is wired with addEventListener.
(() => {
  // -- Delete's confirmation ------------------------------------------------------------------
  const shown = (el) => !!el && el.getClientRects().length > 0;
  let confirmOpen = false;
  let confirmed = false;
  const watchConfirm = () => {
    const box = document.getElementById("delete-confirm"); // Gradio may take it out of the page when hidden
    if (box && box.getAttribute("role") !== "alertdialog") {
      box.setAttribute("role", "alertdialog");
      box.setAttribute("aria-labelledby", "delete-confirm-text");
    }
    const open = shown(box);
    if (open === confirmOpen) return;
    confirmOpen = open;
    if (open) {
      confirmed = false;
      const cancel = document.getElementById("delete-confirm-no");
      if (cancel) cancel.focus();
      return;
    }
    // Closed: the focus was inside (now hidden) or nowhere. Back to Delete, or the box after a deletion.
    const active = document.activeElement;
    if (active && active !== document.body && active.isConnected && !(box && box.contains(active))) return;
    const target = confirmed ? document.querySelector("#input textarea") : document.getElementById("delete");
    if (target) target.focus();
  };
  document.addEventListener("click", (event) => {
    if (event.target.closest && event.target.closest("#delete-confirm-yes")) confirmed = true;
  }, true);
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || !event.target.closest || !event.target.closest("#delete-confirm")) return;
    event.preventDefault();
    event.stopPropagation();
    const cancel = document.getElementById("delete-confirm-no");
    if (cancel) cancel.click();
  }, true);

  // -- send turns into Stop --------------------------------------------------------------------
  const statusText = () => {
    const el = document.querySelector("#status [data-testid='markdown']");
    return el ? el.innerText.trim() : "";
  };
  const watchAnswering = () => {
    const text = statusText();  // "Answering…" in the page's language (i18n.js)
    const busy = window.vlchat && window.vlchat.answering ? window.vlchat.answering(text) : /^Answering/.test(text);
    if (document.body.classList.contains("vl-answering") === busy) return;
    const stop = document.querySelector("#input .stop-button");
    const hadStop = !!stop && document.activeElement === stop;
    document.body.classList.toggle("vl-answering", busy);
    if (!busy && hadStop) {
      const box = document.querySelector("#input textarea");
      if (box) box.focus();
    }
  };

  const check = window.vlchat.perFrame(() => {
    watchConfirm();
    watchAnswering();
  });
  const start = () => {
    if (!document.body) return setTimeout(start, 50);
    new MutationObserver(check).observe(document.body, { subtree: true, childList: true, characterData: true,
      attributes: true, attributeFilter: ["class", "style", "hidden"] });
    check();
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
