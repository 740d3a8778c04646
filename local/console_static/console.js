// pushline console: live updates by polling. Every element with a data-fragment URL is refreshed
// from it; the page works without this script (forms POST, then redirect; a refresh link remains).
"use strict";
(function () {
  var INTERVAL_MS = 1000;

  function refresh(el) {
    var url = el.getAttribute("data-fragment");
    if (!url) return Promise.resolve();
    return fetch(url, { cache: "no-store", headers: { Accept: "text/html" } })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html === null) return;
        var incoming = document.createElement("template");
        incoming.innerHTML = html;
        // Replace only what changed (a live region would re-announce), never under the keyboard focus.
        if (incoming.innerHTML === el.innerHTML || el.contains(document.activeElement)) return;
        el.innerHTML = incoming.innerHTML;
        // A notification's status is followed until it is settled (done, or cancelled and every token final).
        if (el.querySelector("[data-settled]")) el.removeAttribute("data-fragment");
      })
      .catch(function () { /* the stack may be restarting: try again on the next tick */ });
  }

  function tick() {
    if (!document.hidden) {
      document.querySelectorAll("[data-fragment]").forEach(refresh);
    }
    window.setTimeout(tick, INTERVAL_MS);
  }

  window.setTimeout(tick, INTERVAL_MS);
})();
