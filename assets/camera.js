// vlchat camera.js (issue 11, "Describe in one step"): put into <head> by chat.page.mount_options.
//
// "Take a photo" (#camera, built here next to the page's "Describe a photo" upload button):
// - on a phone or tablet it opens the system camera (<input type=file accept="image/*" capture>);
// - on a desktop it opens a modal <dialog> with a live preview (getUserMedia), "Take photo" and "Cancel";
//   focus moves into it and back to where it was, Escape closes it, the camera is released on close, and
//   a missing camera or a refused permission is said in words.
// The photo, from either, is sent exactly like an uploaded one: `vlchat.describeFile(file)` puts it into
// the "Describe a photo" button's own file input and fires `change`, so it takes the one server path
// (chat.describe.describe: the mode's describe prompt, checks, store, stream).
// No eval, no inline handlers (the page's CSP): everything is wired with addEventListener.
(() => {
  const DESCRIBE = "describe-photo";

  // -- sending a photo --------------------------------------------------------------------
  // Gradio's UploadButton renders a hidden <input type=file> just before its <button>.
  const describeInput = () => {
    const button = document.getElementById(DESCRIBE);
    if (!button) return null;
    for (let el = button.previousElementSibling; el; el = el.previousElementSibling) {
      if (el.matches("input[type=file]")) return el;
    }
    return button.parentElement ? button.parentElement.querySelector("input[type=file]") : null;
  };
  const describeFile = (file) => {
    const input = describeInput();
    if (!input || !file) return false;
    const data = new DataTransfer();
    data.items.add(file);
    input.files = data.files;
    input.dispatchEvent(new Event("change", { bubbles: true }));
    return true;
  };

  // -- phones and tablets: the system camera ----------------------------------------------
  const mobile = () =>
    (navigator.userAgentData && navigator.userAgentData.mobile) ||
    /Android|iPhone|iPad|iPod|Mobi/i.test(navigator.userAgent) ||
    (navigator.maxTouchPoints > 1 && window.matchMedia("(pointer: coarse)").matches);
  let captureInput = null;
  const openSystemCamera = () => {
    if (!captureInput) {
      captureInput = document.createElement("input");
      captureInput.type = "file";
      captureInput.accept = "image/*";
      captureInput.setAttribute("capture", "environment");
      captureInput.id = "camera-input";
      captureInput.hidden = true;
      captureInput.tabIndex = -1;
      captureInput.addEventListener("change", () => {
        const file = captureInput.files && captureInput.files[0];
        if (file) describeFile(file);
        captureInput.value = ""; // the same photo again is a new change
      });
      document.body.appendChild(captureInput);
    }
    captureInput.click();
  };

  // -- desktops: a dialog with a live preview ---------------------------------------------
  let ui = null; // {dialog, message, video, take, cancel}
  let stream = null;
  let opening = 0; // which opening a getUserMedia answer belongs to (the dialog may be closed and reopened)
  let returnTo = null;

  const el = (tag, props, style) => {
    const node = Object.assign(document.createElement(tag), props || {});
    if (style) Object.assign(node.style, style);
    return node;
  };
  const buttonStyle = {
    padding: "0.5rem 1rem", borderRadius: "8px", fontSize: "1rem", fontWeight: "600", cursor: "pointer",
    border: "1px solid var(--button-secondary-border-color, #6b7280)",
  };
  const build = () => {
    // Inside .gradio-container, so the page's own styles (focus ring, colours, dark mode) apply.
    const host = document.querySelector(".gradio-container") || document.body;
    const dialog = el("dialog", { id: "camera-dialog" }, {
      maxWidth: "min(40rem, 95vw)", padding: "1.25rem", borderRadius: "12px",
      border: "1px solid var(--border-color-primary, #6b7280)",
      background: "var(--background-fill-primary, #ffffff)", color: "var(--body-text-color, #111827)",
    });
    dialog.setAttribute("aria-labelledby", "camera-title");
    dialog.setAttribute("aria-describedby", "camera-message");
    const title = el("h2", { id: "camera-title", textContent: "Take a photo" },
      { fontSize: "1.25rem", margin: "0 0 0.5rem" });
    const message = el("p", { id: "camera-message" }, { margin: "0 0 0.75rem" });
    message.setAttribute("role", "status");
    const video = el("video", { id: "camera-preview", autoplay: true, muted: true, playsInline: true },
      { display: "block", width: "100%", maxHeight: "60vh", background: "#000000", borderRadius: "8px" });
    video.setAttribute("aria-label", "Camera preview");
    const row = el("div", {}, { display: "flex", gap: "0.75rem", marginTop: "0.75rem", flexWrap: "wrap" });
    const take = el("button", { type: "button", id: "camera-take", textContent: "Take photo",
      className: "lg primary" }, buttonStyle);
    const cancel = el("button", { type: "button", id: "camera-cancel", textContent: "Cancel",
      className: "lg secondary" }, { ...buttonStyle, background: "var(--button-secondary-background-fill, #f3f4f6)",
      color: "var(--button-secondary-text-color, #111827)" });
    row.append(take, cancel);
    dialog.append(title, message, video, row);
    host.appendChild(dialog);

    take.addEventListener("click", () => capture());
    // The camera is let go at once (the dialog's "close" event comes a task later, and does it again).
    cancel.addEventListener("click", () => {
      release();
      dialog.close();
    });
    // Escape closes a modal dialog by itself (a "cancel", then "close"); every way out ends here.
    dialog.addEventListener("close", () => {
      opening += 1;
      release();
      const back = returnTo && returnTo.isConnected ? returnTo : document.getElementById("camera");
      returnTo = null;
      if (back) back.focus();
    });
    return { dialog, message, video, take, cancel };
  };
  const say = (text) => {
    if (ui.message.textContent !== text) ui.message.textContent = text;
  };
  const release = () => {
    if (stream) stream.getTracks().forEach((track) => track.stop());
    stream = null;
    if (ui) ui.video.srcObject = null;
  };
  const failed = (text) => {
    // Nothing to take: the way out gets the focus, and says so.
    ui.cancel.textContent = "Close";
    ui.cancel.focus();
    ui.take.hidden = true;
    say(text);
  };
  const WHY = {
    NotAllowedError: "Camera permission was refused. Allow the camera for this site in the browser's settings, "
      + "or close this and use Describe a photo to choose a picture.",
    SecurityError: "Camera permission was refused. Allow the camera for this site in the browser's settings, "
      + "or close this and use Describe a photo to choose a picture.",
    NotFoundError: "No camera was found. Connect one, or close this and use Describe a photo to choose a picture.",
    OverconstrainedError: "No usable camera was found. Close this and use Describe a photo to choose a picture.",
    NotReadableError: "The camera could not be started; another program may be using it. Close that program "
      + "and try again, or use Describe a photo.",
  };
  const openDialog = async () => {
    ui = ui && ui.dialog.isConnected ? ui : build();
    if (ui.dialog.open) return;
    const mine = ++opening;
    const active = document.activeElement;
    returnTo = active && active !== document.body ? active : document.getElementById("camera");
    ui.take.hidden = false;
    ui.cancel.textContent = "Cancel";
    say("Starting the camera… If the browser asks, allow it to use the camera.");
    ui.dialog.showModal();
    ui.take.focus();
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      failed("This browser cannot use a camera on this page (it needs HTTPS, or localhost). Close this and use "
        + "Describe a photo to choose a picture.");
      return;
    }
    let got;
    try {
      got = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
    } catch (err) {
      if (mine === opening) failed(WHY[err && err.name] || "The camera could not be started. Close this and use "
        + "Describe a photo to choose a picture.");
      return;
    }
    if (mine !== opening || !ui.dialog.open) {
      got.getTracks().forEach((track) => track.stop()); // closed meanwhile: let the camera go at once
      return;
    }
    stream = got;
    ui.video.srcObject = stream;
    try {
      await ui.video.play();
    } catch (e) {
      /* autoplay of a muted stream is allowed; the preview shows once it has a frame */
    }
    if (mine === opening) say("Camera ready. Point it at what you want described and press Take photo.");
  };
  const capture = () => {
    const video = ui.video;
    if (!stream || !video.videoWidth) {
      say("The camera is not ready yet; wait a moment and press Take photo again.");
      return;
    }
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
    canvas.toBlob((blob) => {
      if (!blob) {
        say("The photo could not be taken; press Take photo again.");
        return;
      }
      const stamp = new Date().toISOString().replace(/[:.]/g, "-");
      const file = new File([blob], `camera-${stamp}.jpg`, { type: "image/jpeg" });
      release();
      ui.dialog.close(); // gives the focus back
      describeFile(file);
    }, "image/jpeg", 0.92);
  };

  const openCamera = () => (mobile() ? openSystemCamera() : openDialog());

  // -- the button ---------------------------------------------------------------------------
  const place = () => {
    const describe = document.getElementById(DESCRIBE);
    if (!describe) return false;
    if (document.getElementById("camera")) return true;
    const button = document.createElement("button");
    button.type = "button";
    button.id = "camera";
    button.textContent = "Take a photo";
    button.className = describe.className; // Gradio's own look for a button of this row
    if (!mobile()) button.setAttribute("aria-haspopup", "dialog");
    Object.assign(button.style, { flexGrow: "0", width: "fit-content", minWidth: "min(220px, 100%)" });
    button.addEventListener("click", () => openCamera());
    describe.insertAdjacentElement("afterend", button);
    return true;
  };
  // Off while "Describe a photo" is (the model is still loading), like it.
  const syncDisabled = () => {
    const describe = document.getElementById(DESCRIBE);
    const camera = document.getElementById("camera");
    if (describe && camera && camera.disabled !== describe.disabled) camera.disabled = describe.disabled;
  };
  // The follow-up questions under the chat are one named group.
  const nameGroups = () => {
    const row = document.getElementById("follow-ups");
    if (row && row.getAttribute("role") !== "group") {
      row.setAttribute("role", "group");
      row.setAttribute("aria-label", "Ask next");
    }
  };
  const start = () => {
    const root = document.querySelector("gradio-app") || document.body;
    if (!root || !place()) {
      setTimeout(start, 200);
      return;
    }
    nameGroups();
    syncDisabled();
    // Gradio may re-render the row (or show the follow-ups later): put back what is missing.
    new MutationObserver(() => {
      place();
      nameGroups();
      syncDisabled();
    }).observe(root, { subtree: true, childList: true, attributes: true, attributeFilter: ["disabled"] });
  };

  window.vlchat = Object.assign(window.vlchat || {}, { describeFile, openCamera });
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
