// edgescreen UI: small progressive enhancements. Every page works without this script.
(function () {
  "use strict";
  var csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content;
  window.edgescreen = { csrf: csrf };

  document.addEventListener("change", function (e) {
    var el = e.target;
    if (el.classList && el.classList.contains("autosubmit") && el.form) el.form.submit();
  });
  document.addEventListener("submit", function (e) {
    var form = e.target;
    if (form.classList.contains("confirm") && !window.confirm(form.dataset.confirm || "?")) {
      e.preventDefault();
      return;
    }
    if (form.enctype === "multipart/form-data") {
      var busy = document.getElementById("upload-busy");
      if (busy) busy.hidden = false;
    }
  });

  // The worklist refreshes its table in place; the request says it is not user activity (idle timeout).
  var list = document.getElementById("worklist");
  if (list && list.dataset.refresh) {
    var interval = parseInt(list.dataset.interval || "10000", 10);
    var refresh = function () {
      if (document.hidden) return;
      if (list.contains(document.activeElement) && document.activeElement !== document.body) return;
      fetch(list.dataset.refresh, { credentials: "same-origin", cache: "no-store", headers: { "X-Background": "1" } })
        .then(function (resp) {
          if (resp.redirected || resp.status === 401) { window.location.reload(); return null; }
          return resp.ok ? resp.text() : null;
        })
        .then(function (html) {
          if (html !== null && html !== undefined) {
            list.innerHTML = html;
            list.dataset.refreshedAt = String(Date.now());
          }
        })
        .catch(function () { /* offline for a moment: the next tick tries again */ });
    };
    setInterval(refresh, interval);
  }
})();
