// vlchat prefs.js (issue 11): filled in by its own commit.
window.vlchat = window.vlchat || {};
