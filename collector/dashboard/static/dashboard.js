// M3DM Fleet dashboard: refresh each [data-partial] block from its endpoint every few seconds.
// Plain fetch, no framework: a block is replaced only when its HTML changed, so images are not reloaded
// and a reader's scroll position survives. New NOK cards get a short highlight.
(function () {
  "use strict";
  const refreshMs = Number(document.body.dataset.refreshMs) || 2000;
  const live = document.getElementById("live");
  const blocks = Array.from(document.querySelectorAll("[data-partial]"));
  const lastHtml = new Map();
  let busy = false;

  function keysOf(el) {
    return new Set(Array.from(el.querySelectorAll("[data-key]"), (n) => n.dataset.key));
  }

  async function refreshBlock(el) {
    const resp = await fetch(el.dataset.partial, { cache: "no-store", headers: { Accept: "text/html" } });
    if (!resp.ok) throw new Error(el.dataset.partial + " answered " + resp.status);
    const html = await resp.text();
    if (lastHtml.get(el) === html) return;
    const before = keysOf(el);
    const scroller = el.querySelector(".nok-list");
    const scrollTop = scroller ? scroller.scrollTop : 0;
    el.innerHTML = html;
    lastHtml.set(el, html);
    const after = el.querySelector(".nok-list");
    if (after) after.scrollTop = scrollTop;
    if (before.size || el.id === "nok-feed") {
      el.querySelectorAll("[data-key]").forEach((n) => {
        if (!before.has(n.dataset.key)) n.classList.add("fresh");
      });
    }
  }

  async function tick() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      await Promise.all(blocks.map(refreshBlock));
      live.classList.remove("stale");
    } catch (err) {
      live.classList.add("stale");
      console.warn("dashboard refresh failed:", err);
    } finally {
      busy = false;
    }
  }

  blocks.forEach((el) => lastHtml.set(el, null));
  setInterval(tick, refreshMs);
  document.addEventListener("visibilitychange", tick);
})();
