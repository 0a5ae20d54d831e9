// vlchat: move a browser identity that older pages kept in localStorage (Gradio BrowserState,
// key "vlchat-identity") to the server's HttpOnly cookie. Runs once per browser: the server
// decrypts the entry, sets the cookie to that identity, and the entry is removed here; the page
// then reloads so its conversation list is the migrated one.
(() => {
  const KEY = "vlchat-identity";
  let stored = null;
  try {
    stored = window.localStorage.getItem(KEY);
  } catch (e) {
    return; // storage blocked: nothing to migrate
  }
  if (!stored) return;
  const url = new URL("identity/migrate", window.location.href.split(/[?#]/)[0].replace(/[^/]*$/, ""));
  fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ value: stored }),
  })
    .then((r) => r.json().catch(() => ({})))
    .then((answer) => {
      if (answer && answer.forget) window.localStorage.removeItem(KEY);
      if (answer && answer.migrated) window.location.reload();
    })
    .catch(() => {}); // offline or restarting: tried again on the next visit
})();
