// vlchat keyboard shortcuts (issue 11, "Keyboard"); put into <head> by chat.page.mount_options.
//
// Two kinds of keys, so that shortcuts fight neither screen readers nor typing:
// - Alt+Shift+letter (Option+Shift on a Mac) works everywhere, the message box included. The letter is
//   the one the key types (event.key), or, where Option turns it into another character (macOS), the
//   key's place on the keyboard (event.code). In browse mode NVDA and JAWS keep single letters and the
//   arrows for their own navigation, but pass Alt+Shift+letter (none of their default commands) to the page.
// - Single keys ("?", "/", "j", "k", and the arrows on a message) only where focus is not in a text
//   field, so typing them in the message box types them.
// The "Keyboard shortcuts" button and "?" open a native <dialog> listing every shortcut (Escape closes it
// and focus goes back where it was). Previous / next message focuses the message element (a named
// article: a screen reader reads its label, "bot's message: ..."). No inline handlers and no eval:
// everything is wired with addEventListener and built with createElement.
// Other scripts' functions are called through window.vlchat (announce.js: announce, readLast,
// stopReading, readMessage; camera.js: describeFile, openCamera); a missing one is said, not thrown.
(() => {
  const vl = () => window.vlchat || {};
  const say = (text) => {
    if (typeof vl().announce === "function") vl().announce(text);
  };
  const $ = (sel) => document.querySelector(sel);
  const buttonOf = (sel) => {
    const el = $(sel);
    if (!el) return null;
    return el.matches("button, input") ? el : el.querySelector("button") || el;
  };
  const click = (sel) => {
    const b = buttonOf(sel);
    if (!b || b.disabled) return false;
    b.click();
    return true;
  };

  // -- the page's parts ---------------------------------------------------------------------
  const box = () => $("#input textarea");
  const statusText = () => {
    const el = $("#status [data-testid='markdown']");
    return el ? el.innerText.trim() : "";
  };
  const answering = () => (window.vlchat && window.vlchat.answering ? window.vlchat.answering(statusText())
    : /^Answering/.test(statusText()));
  const MESSAGE = "#chat [data-testid='user'], #chat [data-testid='bot']";
  const messages = () => Array.from(document.querySelectorAll(MESSAGE));
  const messageOf = (el) => (el && el.closest ? el.closest(MESSAGE) : null);
  // Each message is focusable from script (not a Tab stop) and a named article, so focusing it reads
  // its label ("user's message: ...", set by page.js); a generic <div> may not carry a name.
  const prepare = (el) => {
    if (el.getAttribute("tabindex") !== "-1") el.setAttribute("tabindex", "-1");
    if (el.getAttribute("role") !== "article") el.setAttribute("role", "article");
  };

  // -- actions ------------------------------------------------------------------------------
  const focusBox = () => {
    const b = box();
    if (!b || b.disabled) {
      say("The message box is not ready yet.");
      return;
    }
    b.focus();
  };
  const describePhoto = () => {
    if (!click("#describe-photo")) say("Describing a photo is not available.");
  };
  const takePhoto = () => {
    if (typeof vl().openCamera === "function") vl().openCamera();
    else if (!click("#camera")) say("Taking a photo is not available.");
  };
  const extension = (type) => (type.split("/")[1] || "png").replace("jpeg", "jpg").replace(/[^a-z0-9]/g, "");
  const pasteAndSend = async () => {
    if (typeof vl().describeFile !== "function") {
      say("Describing a photo is not available.");
      return;
    }
    if (!navigator.clipboard || typeof navigator.clipboard.read !== "function") {
      say("This browser does not let the page read the clipboard. Paste with Control+V in the message box.");
      return;
    }
    let items;
    try {
      items = await navigator.clipboard.read();
    } catch (e) {
      say("The clipboard could not be read: allow the page to see the clipboard, or paste with Control+V in the message box.");
      return;
    }
    for (const item of items) {
      const type = item.types.find((t) => t.startsWith("image/"));
      if (!type) continue;
      const blob = await item.getType(type);
      const file = new File([blob], `clipboard.${extension(type)}`, { type });
      if (vl().describeFile(file) === false) say("Describing a photo is not available.");
      else say("Sending the image from the clipboard.");
      return;
    }
    say("The clipboard has no image.");
  };
  const stopAnswer = () => {
    const busy = answering();
    const speaking = !!(window.speechSynthesis && window.speechSynthesis.speaking);
    click("#stop"); // also stops reading aloud (announce.js)
    if (!busy && !speaking) say("No answer is being written.");
  };
  const readLast = () => {
    if (!$("#chat [data-testid='bot']")) say("There is no answer to read yet.");
    else if (typeof vl().readLast === "function") vl().readLast();
    else say("Reading aloud is not available.");
  };
  const stopReading = () => {
    if (typeof vl().stopReading === "function") vl().stopReading();
    else say("Reading aloud is not available.");
  };
  const readMessage = (el) => {
    if (typeof vl().readMessage === "function") vl().readMessage(el);
    else say("Reading aloud is not available.");
  };
  const newChat = () => {
    if (!click("#new-chat")) {
      say("New chat is not available.");
      return;
    }
    say("New chat.");
    const b = box();
    if (b && !b.disabled) b.focus();
  };
  const showMessage = (el) => {
    prepare(el);
    el.focus();
    if (typeof el.scrollIntoView === "function") el.scrollIntoView({ block: "nearest" });
  };
  // From a message, one up or down; from anywhere else, either key goes to the newest message.
  const move = (step) => {
    const all = messages();
    if (!all.length) {
      say("No messages yet.");
      return;
    }
    const here = all.indexOf(messageOf(document.activeElement));
    if (here < 0) return showMessage(all[all.length - 1]);
    const to = here + step;
    if (to < 0) say("First message");
    else if (to >= all.length) say("Last message");
    else showMessage(all[to]);
  };
  const edge = (last) => {
    const all = messages();
    if (!all.length) say("No messages yet.");
    else showMessage(all[last ? all.length - 1 : 0]);
  };

  // -- the shortcuts, as listed in the dialog --------------------------------------------------
  // alt: the letter with Alt+Shift. keys: how the dialog writes them.
  const SHORTCUTS = [
    { alt: "m", keys: ["Alt+Shift+M", "/"], action: "Focus the message box", run: focusBox },
    { alt: "d", keys: ["Alt+Shift+D"], action: "Describe a photo: choose an image; it is sent at once", run: describePhoto },
    { alt: "c", keys: ["Alt+Shift+C"], action: "Take a photo with the camera and describe it", run: takePhoto },
    { alt: "v", keys: ["Alt+Shift+V"], action: "Paste and send: describe the image on the clipboard", run: pasteAndSend },
    { alt: "s", keys: ["Alt+Shift+S", "Escape in the message box"], action: "Stop the answer being written (and reading aloud)", run: stopAnswer },
    { alt: "r", keys: ["Alt+Shift+R"], action: "Read the last answer aloud", run: readLast },
    { alt: "x", keys: ["Alt+Shift+X"], action: "Stop reading aloud", run: stopReading },
    { alt: "k", keys: ["Alt+Shift+K", "K", "Up arrow on a message"], action: "Previous message (from elsewhere: the newest message)", run: () => move(-1) },
    { alt: "j", keys: ["Alt+Shift+J", "J", "Down arrow on a message"], action: "Next message (from elsewhere: the newest message)", run: () => move(1) },
    { keys: ["Home", "End"], action: "First, last message (on a message)" },
    { keys: ["Enter on a message"], action: "Read that message aloud" },
    { keys: ["Escape on a message"], action: "Back to the message box" },
    { alt: "n", keys: ["Alt+Shift+N"], action: "New chat", run: newChat },
    { alt: "h", keys: ["Alt+Shift+H", "?"], action: "Show these keyboard shortcuts", run: () => showShortcuts() },
  ];
  const byLetter = new Map(SHORTCUTS.filter((s) => s.alt).map((s) => [s.alt, s]));

  // -- the dialog ----------------------------------------------------------------------------
  const STYLE = `
#shortcuts-dialog { max-width: min(44rem, calc(100vw - 2rem)); max-height: calc(100vh - 2rem); overflow: auto;
  padding: 1rem 1.25rem; border: 2px solid #4b5563; border-radius: 8px;
  background: var(--background-fill-primary, #ffffff); color: var(--body-text-color, #111827);
  font-family: var(--font, system-ui, sans-serif); font-size: 0.95rem; line-height: 1.45; }
#shortcuts-dialog::backdrop { background: rgba(0, 0, 0, 0.55); }
#shortcuts-dialog h2 { font-size: 1.2rem; margin: 0 0 0.5rem; }
#shortcuts-dialog p { margin: 0 0 0.75rem; }
#shortcuts-dialog table { border-collapse: collapse; width: 100%; margin: 0 0 1rem; }
#shortcuts-dialog th, #shortcuts-dialog td { text-align: left; vertical-align: top; padding: 0.3rem 0.5rem;
  border-bottom: 1px solid #9ca3af; }
#shortcuts-dialog kbd { font-family: ui-monospace, monospace; font-size: 0.9em; padding: 0 0.25rem;
  border: 1px solid currentColor; border-radius: 3px; white-space: nowrap; }
#shortcuts-dialog button { font: inherit; padding: 0.35rem 1rem; border-radius: 6px; cursor: pointer;
  border: 1px solid #4b5563; background: #e5e7eb; color: #111827; }
#shortcuts-dialog :focus-visible { outline: 3px solid #1d4ed8; outline-offset: 2px; }
.dark #shortcuts-dialog { border-color: #9ca3af; }
.dark #shortcuts-dialog button { background: #374151; color: #f9fafb; border-color: #9ca3af; }
.dark #shortcuts-dialog :focus-visible { outline-color: #93c5fd; }
#shortcuts.vl-shortcuts-button { align-self: flex-start; width: auto; margin: 0.25rem 0; padding: 0.3rem 0.8rem;
  font: inherit; font-size: 0.9rem; border-radius: 6px; border: 1px solid #4b5563; cursor: pointer;
  background: var(--button-secondary-background-fill, #e5e7eb); color: var(--button-secondary-text-color, #111827); }
html.vl-hc #shortcuts-dialog { background: #000000; color: #ffffff; border-color: #ffffff; }
html.vl-hc #shortcuts-dialog :is(th, td) { border-color: #ffffff; }
html.vl-hc #shortcuts-dialog button { background: #000000; color: #ffff00; border: 2px solid #ffff00; }
html.vl-hc #shortcuts-dialog :focus-visible { outline-color: #ffff00; }
@media (forced-colors: active) {
  #shortcuts-dialog, #shortcuts-dialog button, #shortcuts.vl-shortcuts-button { border: 1px solid CanvasText; }
  #shortcuts-dialog :focus-visible { outline: 3px solid Highlight; }
}`;
  const addStyle = () => {
    // A constructed stylesheet (CSSOM): no <style> text, no style attributes.
    if (typeof CSSStyleSheet !== "function" || !("adoptedStyleSheets" in document)) return;
    try {
      const sheet = new CSSStyleSheet();
      sheet.replaceSync(STYLE);
      document.adoptedStyleSheets = [...document.adoptedStyleSheets, sheet];
    } catch (e) {
      /* an old browser: the browser's own dialog look */
    }
  };

  const el = (tag, props, ...children) => {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    children.forEach((c) => node.append(c));
    return node;
  };
  const keysCell = (keys) => {
    const cell = el("td");
    keys.forEach((k, i) => {
      if (i) cell.append(i === keys.length - 1 ? " or " : ", ");
      const m = /^(.*?)( on a message| in the message box)$/.exec(k);
      cell.append(el("kbd", { textContent: m ? m[1] : k }));
      if (m) cell.append(m[2]);
    });
    return cell;
  };
  let dialog = null;
  let returnTo = null;
  const buildDialog = () => {
    const d = el("dialog", { id: "shortcuts-dialog" });
    d.setAttribute("aria-labelledby", "shortcuts-title");
    const table = el("table");
    const head = el("tr", {}, el("th", { textContent: "Keys", scope: "col" }), el("th", { textContent: "Action", scope: "col" }));
    const body = el("tbody");
    SHORTCUTS.forEach((s) => body.append(el("tr", {}, keysCell(s.keys), el("td", { textContent: s.action }))));
    table.append(el("thead", {}, head), body);
    const close = el("button", { type: "button", id: "shortcuts-close", textContent: "Close" });
    close.addEventListener("click", () => d.close());
    d.append(
      el("h2", { id: "shortcuts-title", textContent: "Keyboard shortcuts", tabIndex: -1 }),
      el("p", {
        textContent:
          "Alt+Shift shortcuts work anywhere on the page, in the message box too (on a Mac: Option+Shift). " +
          "Single keys work when you are not typing in a text field. Escape closes this dialog.",
      }),
      el("p", {
        textContent:
          "With NVDA or JAWS in browse mode, use the Alt+Shift keys: browse mode keeps single letters and the " +
          "arrows for itself. Moving to a message puts the focus on it, and the screen reader reads it.",
      }),
      table,
      close,
    );
    d.addEventListener("close", () => {
      const to = returnTo;
      returnTo = null;
      if (to && to.isConnected && typeof to.focus === "function") to.focus();
    });
    document.body.appendChild(d);
    return d;
  };
  const showShortcuts = () => {
    if (!dialog || !dialog.isConnected) dialog = buildDialog();
    if (dialog.open) return;
    returnTo = document.activeElement && document.activeElement !== document.body ? document.activeElement : null;
    dialog.showModal();
    // Focus on the title (a long list would scroll its start out of view if the Close button at its end
    // took the focus); Tab goes on to Close.
    dialog.querySelector("#shortcuts-title").focus();
    dialog.scrollTop = 0;
  };

  // The "Keyboard shortcuts" button under the page's title.
  const placeButton = () => {
    if (document.getElementById("shortcuts")) return true;
    const title = document.getElementById("page-title");
    if (!title || !title.parentElement) return false;
    const b = el("button", { type: "button", id: "shortcuts", className: "vl-shortcuts-button", textContent: "Keyboard shortcuts" });
    b.setAttribute("aria-haspopup", "dialog");
    b.setAttribute("aria-keyshortcuts", "Alt+Shift+H");
    b.addEventListener("click", showShortcuts);
    title.parentElement.insertBefore(b, title.nextSibling);
    return true;
  };

  // aria-keyshortcuts on the controls the shortcuts press (screen readers can say them), tabindex and
  // role on the messages; kept through Gradio's re-renders.
  const KEYSHORTCUTS = {
    "#new-chat": "Alt+Shift+N",
    "#stop": "Alt+Shift+S",
    "#read-aloud": "Alt+Shift+R",
    "#stop-reading": "Alt+Shift+X",
    "#describe-photo": "Alt+Shift+D",
    "#camera": "Alt+Shift+C",
    "#input textarea": "Alt+Shift+M",
  };
  const fix = () => {
    placeButton();
    for (const [sel, keys] of Object.entries(KEYSHORTCUTS)) {
      const b = sel === "#input textarea" ? $(sel) : buttonOf(sel);
      if (b && b.getAttribute("aria-keyshortcuts") !== keys) b.setAttribute("aria-keyshortcuts", keys);
    }
    messages().forEach(prepare);
  };

  // -- the key handler ------------------------------------------------------------------------
  const TEXT_INPUTS = /^(text|search|email|url|tel|password|number|date|datetime-local|month|time|week)$/;
  const typing = (t) =>
    !!t && (t.isContentEditable || t.tagName === "TEXTAREA" || t.tagName === "SELECT" ||
      (t.tagName === "INPUT" && TEXT_INPUTS.test(t.type || "text")));
  const modal = () => {
    try {
      return document.querySelector("dialog:modal");
    } catch (e) {
      return dialog && dialog.open ? dialog : null; // no :modal in this browser
    }
  };
  const letterOf = (event) => {
    if (/^[a-z]$/i.test(event.key)) return event.key.toLowerCase();
    if (/^Key[A-Z]$/.test(event.code)) return event.code.slice(3).toLowerCase(); // macOS Option+Shift
    return null;
  };
  const onKey = (event) => {
    if (event.defaultPrevented || event.isComposing) return;
    const target = event.target;
    const open = !!modal();
    // Alt+Shift+letter: anywhere.
    if (event.altKey && event.shiftKey && !event.ctrlKey && !event.metaKey) {
      const s = byLetter.get(letterOf(event));
      if (!s) return;
      event.preventDefault();
      event.stopPropagation();
      if (event.repeat) return;
      if (open) {
        if (s.alt === "h" && dialog && dialog.open) dialog.close();
        return; // a modal dialog (this one, the camera's) is open: nothing else meanwhile
      }
      s.run();
      return;
    }
    if (open || event.altKey || event.ctrlKey || event.metaKey) return;
    const message = messageOf(target);
    if (message && target === message) {
      const keys = {
        ArrowUp: () => move(-1), k: () => move(-1), K: () => move(-1),
        ArrowDown: () => move(1), j: () => move(1), J: () => move(1),
        Home: () => edge(false), End: () => edge(true),
        Enter: () => readMessage(message), Escape: () => focusBox(),
      };
      const run = keys[event.key];
      if (run && !(event.shiftKey && event.key.length > 1)) {
        event.preventDefault();
        run();
        return;
      }
    }
    if (event.key === "Escape" && target === box() && answering()) {
      event.preventDefault();
      stopAnswer();
      return;
    }
    if (typing(target)) return;
    const single = { "?": () => showShortcuts(), "/": focusBox, j: () => move(1), k: () => move(-1) };
    const run = single[event.key];
    if (run) {
      event.preventDefault();
      run();
    }
  };

  const schedule = window.vlchat.perFrame(fix);
  const start = () => {
    const root = document.querySelector("gradio-app") || document.body;
    if (!root) return setTimeout(start, 200);
    addStyle();
    new MutationObserver(schedule).observe(root, { subtree: true, childList: true });
    fix();
  };
  // Capture phase on window: before Gradio's own handlers, so Alt+Shift+letter never types a character.
  window.addEventListener("keydown", onKey, true);
  window.vlchat = Object.assign(window.vlchat || {}, { showShortcuts });
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
