// The slice viewer: slices are PNGs rendered on the box at the chosen window; the viewer keeps the ones it
// fetched in memory (never on disk: they show a patient) and prefetches ahead of the scroll direction.
(function () {
  "use strict";
  var PRESET_KEYS = { "1": "soft", "2": "pancreas", "3": "bone" };
  var MAX_CACHED = 400;

  function Viewer(root) {
    this.root = root;
    this.base = root.dataset.base;
    this.count = parseInt(root.dataset.count, 10);
    this.index = parseInt(root.dataset.start, 10) || 0;
    this.preset = "soft";
    this.zoom = 1;
    this.direction = 1;
    this.cache = new Map();
    this.pending = new Map();
    this.token = 0;
    this.stage = root.querySelector(".stage");
    this.canvas = root.querySelector(".canvas");
    this.slice = root.querySelector("img.slice");
    this.overlays = Array.prototype.slice.call(root.querySelectorAll("img.ov"));
    this.slider = root.querySelector(".slider");
    this.pos = root.querySelector(".pos");
    this.bind();
    this.show(this.index);
  }

  Viewer.prototype.url = function (kind, i) {
    if (kind === "slice") return this.base + "/slices/" + i + ".png?preset=" + this.preset;
    return this.base + "/overlays/" + kind + "/" + i + ".png";
  };

  Viewer.prototype.fetch = function (url) {
    var self = this;
    if (this.cache.has(url)) {
      var hit = this.cache.get(url);
      this.cache.delete(url);
      this.cache.set(url, hit);  // most recently used last
      return Promise.resolve(hit);
    }
    if (this.pending.has(url)) return this.pending.get(url);
    var p = fetch(url, { credentials: "same-origin", cache: "no-store" })
      .then(function (resp) {
        if (!resp.ok) throw new Error(resp.status);
        return resp.blob();
      })
      .then(function (blob) {
        var obj = URL.createObjectURL(blob);
        self.cache.set(url, obj);
        self.pending.delete(url);
        while (self.cache.size > MAX_CACHED) {
          var oldest = self.cache.keys().next().value;
          URL.revokeObjectURL(self.cache.get(oldest));
          self.cache.delete(oldest);
        }
        return obj;
      }, function (err) { self.pending.delete(url); throw err; });
    this.pending.set(url, p);
    return p;
  };

  Viewer.prototype.layersOn = function () {
    return this.overlays.filter(function (img) {
      var box = this.root.querySelector('input.layer[value="' + img.dataset.layer + '"]');
      return box && box.checked;
    }, this);
  };

  Viewer.prototype.show = function (i) {
    var self = this;
    i = Math.max(0, Math.min(this.count - 1, i));
    if (i !== this.index) this.direction = i > this.index ? 1 : -1;
    this.index = i;
    var token = ++this.token;
    if (this.slider) this.slider.value = String(i);
    if (this.pos) this.pos.textContent = (i + 1) + " / " + this.count;
    this.root.dataset.index = String(i);
    this.fetch(this.url("slice", i)).then(function (src) {
      if (token !== self.token) return;
      self.slice.src = src;
      self.root.dataset.shown = String(i);
    }).catch(function () { self.slice.alt = "slice " + (i + 1) + " could not be loaded"; });
    this.overlays.forEach(function (img) {
      var on = self.layersOn().indexOf(img) >= 0;
      if (!on) { img.hidden = true; return; }
      self.fetch(self.url(img.dataset.layer, i)).then(function (src) {
        if (token !== self.token) return;
        img.src = src;
        img.hidden = false;  // shown only once it has a picture: never a broken-image frame
        img.dataset.shown = String(i);
      }).catch(function () { img.hidden = true; });
    });
    this.prefetch();
  };

  Viewer.prototype.prefetch = function () {
    var self = this;
    for (var k = 1; k <= 4; k++) {
      var j = this.index + k * this.direction;
      if (j < 0 || j >= this.count) break;
      this.fetch(this.url("slice", j)).catch(function () {});
      this.layersOn().forEach(function (img) { self.fetch(self.url(img.dataset.layer, j)).catch(function () {}); });
    }
  };

  Viewer.prototype.setZoom = function (z) {
    this.zoom = Math.max(1, Math.min(4, z));
    this.canvas.style.transform = "scale(" + this.zoom + ")";
    this.root.dataset.zoom = String(this.zoom);
  };

  Viewer.prototype.setPreset = function (name) {
    this.preset = name;
    var radio = this.root.querySelector('input[name="preset"][value="' + name + '"]');
    if (radio) radio.checked = true;
    this.root.dataset.preset = name;
    this.show(this.index);
  };

  Viewer.prototype.bind = function () {
    var self = this;
    this.stage.addEventListener("wheel", function (e) {
      e.preventDefault();
      if (e.ctrlKey) { self.setZoom(self.zoom * (e.deltaY < 0 ? 1.25 : 0.8)); return; }
      self.show(self.index + (e.deltaY > 0 ? 1 : -1));
    }, { passive: false });
    this.stage.addEventListener("keydown", function (e) {
      var step = { ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1, PageDown: 10, PageUp: -10 }[e.key];
      if (step) { e.preventDefault(); self.show(self.index + step); return; }
      if (e.key === "Home") { e.preventDefault(); self.show(0); return; }
      if (e.key === "End") { e.preventDefault(); self.show(self.count - 1); return; }
      if (e.key === "+" || e.key === "=") { self.setZoom(self.zoom * 1.25); return; }
      if (e.key === "-") { self.setZoom(self.zoom * 0.8); return; }
      if (PRESET_KEYS[e.key]) { self.setPreset(PRESET_KEYS[e.key]); return; }
      if (e.key === "o") {
        self.root.querySelectorAll("input.layer").forEach(function (b) { b.checked = !b.checked; });
        self.show(self.index);
      }
    });
    var lastY = null;  // a finger dragged up or down on a tablet scrolls through the slices
    this.stage.addEventListener("pointerdown", function (e) { if (e.pointerType !== "mouse") lastY = e.clientY; });
    this.stage.addEventListener("pointermove", function (e) {
      if (lastY === null) return;
      var dy = e.clientY - lastY;
      if (Math.abs(dy) >= 8) { self.show(self.index + (dy > 0 ? 1 : -1)); lastY = e.clientY; }
    });
    ["pointerup", "pointercancel", "pointerleave"].forEach(function (t) {
      self.stage.addEventListener(t, function () { lastY = null; });
    });
    if (this.slider) this.slider.addEventListener("input", function () { self.show(parseInt(self.slider.value, 10)); });
    this.root.querySelectorAll('input[name="preset"]').forEach(function (r) {
      r.addEventListener("change", function () { if (r.checked) self.setPreset(r.value); });
    });
    this.root.querySelectorAll("input.layer").forEach(function (b) {
      b.addEventListener("change", function () { self.show(self.index); });
    });
    var q = function (sel) { return self.root.querySelector(sel); };
    if (q(".zoom-in")) q(".zoom-in").addEventListener("click", function () { self.setZoom(self.zoom * 1.25); });
    if (q(".zoom-out")) q(".zoom-out").addEventListener("click", function () { self.setZoom(self.zoom * 0.8); });
    if (q(".zoom-reset")) q(".zoom-reset").addEventListener("click", function () { self.setZoom(1); });
    // "go to the lesion" in the viewer, and each lesion's "show" in the findings table beside it
    document.querySelectorAll(".jump-lesion, .jump-slice").forEach(function (b) {
      b.addEventListener("click", function () { self.show(parseInt(b.dataset.to, 10)); self.stage.focus(); });
    });
  };

  // Mammography: each view's heatmap is a transparent PNG laid over the plain image; the box shows or hides
  // them all. A result from before the overlays has only key images (heatmap burnt in): those are swapped in.
  function mammo(root) {
    var box = root.querySelector(".toggle-heatmap");
    var apply = function () {
      var on = !!(box && box.checked);
      root.classList.toggle("heat-off", !on);
      root.dataset.heatmap = on ? "on" : "off";
      root.querySelectorAll("img.mg[data-key-image]").forEach(function (img) {
        img.src = on ? img.dataset.keyImage : img.dataset.plain;
      });
    };
    if (box) { box.addEventListener("change", apply); apply(); }
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll(".viewer").forEach(function (el) { el.viewer = new Viewer(el); });
    document.querySelectorAll(".mammo").forEach(mammo);
  });
})();
