// activator status page. Plain JavaScript, no dependencies, no build step.
//
// Data: the page comes with a snapshot ({models, pools, wake_durations, ha}) in a JSON
// block, drawn at once; then one EventSource on admin/events pushes a new one whenever
// something changed. Every URL is relative to the page (/ui),
// so "admin/events" is /admin/events, also behind a proxy that adds a path prefix.
// Every string from the server goes into the page as text (textContent), never as HTML.
"use strict";

(() => {
  const KNOWN_STATES = new Set([
    "stopped", "starting", "ready", "draining", "stopping", "failed", "unknown",
    "falling_asleep", "sleeping", "waking",
  ]);
  // Stop is refused by the server in these states anyway; the button says so up front.
  const NOT_STOPPABLE = new Set(["stopped", "failed", "stopping", "draining", "starting", "waking"]);
  const NOT_WAKEABLE = new Set(["ready", "starting", "waking"]);
  // activator.placement.scaling's reasons for a replica count, in words.
  const SCALE_REASONS = {
    demand: "sized to demand",
    delay: "held by scale_down_delay",
    max: "capped at max",
    pool: "bounded by the pool's free GPUs",
    reclaim: "the pool takes GPUs back",
    unknown: "demand unknown",
  };
  const SVG = "http://www.w3.org/2000/svg";
  const RETRY_MS = 3000;

  // Where an action's notice ends: the states that settle it (a failure shows on the card).
  const SETTLED_BY = {
    wake: new Set(["ready", "failed"]),
    stop: new Set(["stopped", "failed", "sleeping"]),
  };

  const cards = new Map(); // model name -> the parts of its card that change
  let source = null;
  let pendingNotice = null; // {name, states, before, moved}: see notice()

  // ----- small helpers --------------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value !== null && value !== undefined && value !== false) {
        node.setAttribute(key, value === true ? "" : String(value));
      }
    }
    for (const child of children) {
      if (child !== null && child !== undefined) {
        node.append(typeof child === "string" ? document.createTextNode(child) : child);
      }
    }
    return node;
  }

  function svg(tag, attrs = {}, text = null) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
    if (text !== null) node.textContent = text;
    return node;
  }

  function seconds(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    if (value < 1) return `${Math.round(value * 1000)} ms`;
    if (value < 60) return `${value.toFixed(value < 10 ? 2 : 1)} s`;
    const minutes = Math.floor(value / 60);
    const rest = Math.round(value % 60);
    if (minutes < 60) return rest ? `${minutes} min ${rest} s` : `${minutes} min`;
    return minutes % 60 ? `${Math.floor(minutes / 60)} h ${minutes % 60} min` : `${Math.floor(minutes / 60)} h`;
  }

  function bytes(value) {
    if (typeof value !== "number") return value === null || value === undefined ? "–" : String(value);
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let size = value;
    let unit = 0;
    while (size >= 1024 && unit < units.length - 1) {
      size /= 1024;
      unit += 1;
    }
    return `${size.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
  }

  function bound(value) {
    if (value === null) return "more";
    if (value < 1) return `${Math.round(value * 1000)}ms`;
    if (value < 60) return `${value}s`;
    return `${value / 60}m`;
  }

  function stateBadge(state) {
    const known = KNOWN_STATES.has(state) ? state : "other";
    return el("span", { class: `state state-${known}` }, String(state).replace("_", " "));
  }

  function isNumber(value) {
    return typeof value === "number" && Number.isFinite(value);
  }

  function decimals(value) {
    // 1.20 -> "1.2", 3 -> "3": GPU-hours come to 0.01 (below 0.1, two significant digits).
    if (value > 0 && value < 0.01) return "< 0.01";
    return value.toFixed(2).replace(/\.?0+$/, "");
  }

  function money(dollars) {
    // Under a cent but not nothing: "$0.00" would read as free.
    return dollars > 0 && dollars < 0.01 ? "< $0.01" : `$${dollars.toFixed(2)}`;
  }

  function fact(label, value) {
    return el("div", {}, el("dt", {}, label), el("dd", {}, value));
  }

  function notice(text, kind = "info", until = null) {
    // `until`: {name, states, before}: the notice goes once that model's card reaches
    // one of `states` from another state than `before`, its state when the button was
    // pressed (a "Waking m." must not outlive m's wake; a Wake pressed on a failed model
    // ends at its next failure, not at once). Any other notice replaces it.
    const node = document.getElementById("notice");
    node.textContent = text;
    node.dataset.kind = kind;
    pendingNotice = until && { ...until, moved: false };
    if (until && cards.has(until.name)) settleNotice(until.name, cards.get(until.name).root.dataset.state);
  }

  function settleNotice(name, state) {
    if (!pendingNotice || pendingNotice.name !== name) return;
    if (state !== pendingNotice.before) pendingNotice.moved = true;
    if (pendingNotice.moved && pendingNotice.states.has(state)) notice("");
  }

  function setConnection(text, kind) {
    const node = document.getElementById("connection");
    node.textContent = text;
    node.dataset.kind = kind;
  }

  function toLogin() {
    window.location.assign("ui/login");
  }

  // ----- actions --------------------------------------------------------------------

  async function post(url) {
    // The header tells activator this came from the page itself (see activator/ui/auth.py).
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-Activator-UI": "1" },
    });
  }

  async function act(name, action) {
    if (action === "stop" && !window.confirm(
      `Stop model ${name}? Requests in flight are drained first; the next request wakes it again.`,
    )) {
      return;
    }
    const before = cards.has(name) ? cards.get(name).root.dataset.state : null;
    let response;
    try {
      response = await post(`admin/models/${encodeURIComponent(name)}/${action}`);
    } catch (error) {
      notice(`${action} ${name}: activator cannot be reached (${error})`, "error");
      return;
    }
    if (response.status === 401) {
      toLogin();
      return;
    }
    let body = {};
    try {
      body = await response.json();
    } catch (error) {
      body = {};
    }
    if (!response.ok) {
      const message = body.error && body.error.message ? body.error.message : response.statusText;
      notice(`${action} ${name} failed: ${message}`, "error");
    } else if (action === "stop" && body.stopping === false) {
      notice(`${name} was not stopped: it is ${body.state}.`, "info");
    } else {
      notice(`${action === "stop" ? "Stopping" : "Waking"} ${name}.`, "info",
        { name, states: SETTLED_BY[action], before });
    }
  }

  async function loadLog(name, pre) {
    pre.textContent = "loading…";
    try {
      const response = await fetch(`admin/models/${encodeURIComponent(name)}/logs`, {
        credentials: "same-origin",
      });
      if (response.status === 401) {
        toLogin();
        return;
      }
      const body = await response.json();
      if (!response.ok) {
        pre.textContent = body.error && body.error.message ? body.error.message : response.statusText;
        return;
      }
      pre.textContent = body.lines && body.lines.length ? body.lines.join("\n") : "(no output yet)";
    } catch (error) {
      pre.textContent = `cannot load the log: ${error}`;
    }
  }

  // ----- models ---------------------------------------------------------------------

  function modelCard(name) {
    const title = el("h3", {}, name);
    const flags = el("span", { class: "flags" });
    const badge = el("span", { class: "state" });
    const facts = el("dl", { class: "facts" });
    const pending = el("div", { class: "pending" });
    const scale = el("div", { class: "scale" });
    const phases = el("div", { class: "phases" });
    const sleep = el("div", { class: "sleep" });
    const error = el("div", { class: "last-error" });
    const pre = el("pre", { class: "log-lines", tabindex: "0" });
    const details = el("details", { class: "log" }, el("summary", {}, "Engine log"), pre);
    details.addEventListener("toggle", () => {
      if (details.open) loadLog(name, pre);
    });
    const wake = el("button", { type: "button", class: "wake" }, "Wake");
    wake.addEventListener("click", () => act(name, "wake"));
    const stop = el("button", { type: "button", class: "stop danger" }, "Stop");
    stop.addEventListener("click", () => act(name, "stop"));
    wake.setAttribute("aria-label", `Wake ${name}`);
    stop.setAttribute("aria-label", `Stop ${name}`);
    const head = el("header", {}, el("div", { class: "title" }, title, flags), badge);
    const root = el(
      "article",
      { class: "card model", "data-model": name, "aria-label": `model ${name}` },
      head, pending, facts, scale, phases, sleep, error, details,
      el("div", { class: "actions" }, wake, stop),
    );
    return {
      root, head, flags, badge, pending, facts, scale, phases, sleep, error, details, pre, wake, stop,
      lastError: null,
    };
  }

  function phaseBar(model) {
    const entries = Object.entries(model.wake_phases || {})
      .filter(([, at]) => typeof at === "number")
      .sort((a, b) => a[1] - b[1]);
    if (!entries.length) return null;
    const total = Math.max(entries[entries.length - 1][1], model.last_wake_seconds || 0, 1e-6);
    const width = 1000;
    const bar = svg("svg", {
      viewBox: `0 0 ${width} 14`, preserveAspectRatio: "none", class: "phase-bar",
      "aria-hidden": "true", focusable: "false",
    });
    let start = 0;
    let x = 0;
    entries.forEach(([phase, at], i) => {
      const w = Math.max(((at - start) / total) * width, 4);
      const rect = svg("rect", { x: x.toFixed(1), y: 0, width: w.toFixed(1), height: 14, class: `phase p${i % 6}` });
      rect.append(svg("title", {}, `${phase}: ${seconds(at - start)} (at ${seconds(at)})`));
      bar.append(rect);
      x += w;
      start = at;
    });
    bar.setAttribute("viewBox", `0 0 ${Math.max(x, width).toFixed(1)} 14`);
    const legend = el("ol", { class: "phase-legend" });
    start = 0;
    entries.forEach(([phase, at], i) => {
      legend.append(el("li", {}, el("span", { class: `swatch p${i % 6}`, "aria-hidden": "true" }),
        `${phase} ${seconds(at - start)}`));
      start = at;
    });
    const label = model.state === "starting" || model.state === "waking" ? "this wake so far" : "last wake";
    return el("div", {}, el("p", { class: "phase-title" }, `Phases of ${label}`), bar, legend);
  }

  function sleepInfo(model) {
    const sleep = model.sleep;
    if (!sleep || typeof sleep !== "object") return null;
    const list = el("dl", { class: "facts" });
    if (sleep.level !== undefined) list.append(fact("sleep level", String(sleep.level)));
    if (sleep.host_memory !== undefined) list.append(fact("host memory", bytes(sleep.host_memory)));
    if (sleep.host_held !== undefined) list.append(fact("host memory held", bytes(sleep.host_held)));
    if (sleep.last_sleep_seconds !== undefined) {
      list.append(fact("last sleep", seconds(sleep.last_sleep_seconds)));
    }
    return list;
  }

  function flagsOf(model) {
    const flags = [];
    if (model.removing) flags.push(el("span", { class: "flag flag-removing" }, "removing"));
    if (model.restart_pending) flags.push(el("span", { class: "flag flag-restart" }, "restart pending"));
    return flags;
  }

  function pendingNote(model) {
    if (model.removing) {
      return el("p", { class: "note" }, "Removed from the config: drained, then stopped.");
    }
    if (!model.restart_pending) return null;
    const keys = Array.isArray(model.restart_pending_keys) ? model.restart_pending_keys.map(String) : [];
    return el("p", { class: "note" },
      "Changed by a reload, applied at the next start" + (keys.length ? `: ${keys.join(", ")}` : "."));
  }

  function costText(cost) {
    if (!cost || typeof cost !== "object" || !isNumber(cost.gpu_hours)) return null;
    if (isNumber(cost.dollars)) return `${decimals(cost.gpu_hours)} GPU-h · ${money(cost.dollars)}`;
    return cost.gpu_hours > 0 ? `${decimals(cost.gpu_hours)} GPU-h` : null;
  }

  function podStatus(pod) {
    if (pod.broken) return ["broken", "down"];
    if (pod.terminating) return ["terminating", "down"];
    if (pod.routable) return ["routable", "up"];
    if (!pod.ready) return ["not ready", "down"];
    if (!pod.probed) return ["probing", "wait"];
    return ["not routable", "down"];
  }

  function scaleInfo(model) {
    // Scaled out (replicas.max > 1): what it asks for and runs, why, and each pod's load.
    const r = model.replicas;
    if (!r || typeof r !== "object") return null;
    const wanted = isNumber(r.desired) ? r.desired : (isNumber(r.spec) ? r.spec : 0);
    const parts = [el("p", { class: "replicas-line" },
      el("strong", {}, `replicas ${wanted} of max ${r.max}`), ` · ${r.routable ?? 0} routable`)];
    const change = r.last_change;
    if (change && typeof change === "object") {
      const at = isNumber(change.at) ? ` at ${new Date(change.at * 1000).toLocaleTimeString()}` : "";
      parts.push(el("p", { class: "scale-change" },
        `last scale ${change.direction} ${change.from} → ${change.to}: `
        + `${SCALE_REASONS[change.reason] || String(change.reason)}, demand ${change.demand}${at}`));
    }
    const decision = r.last_decision;
    if (decision && typeof decision === "object") {
      parts.push(el("p", { class: "scale-decision" },
        `now: ${decision.desired} wanted, ${SCALE_REASONS[decision.reason] || String(decision.reason)}, `
        + `demand ${decision.demand}`));
    }
    const pods = Array.isArray(r.pods) ? r.pods : [];
    const limit = isNumber(r.limit_per_pod) ? r.limit_per_pod : 1;
    if (!pods.length) {
      parts.push(el("p", { class: "muted" }, "No pods yet."));
    } else {
      parts.push(el("p", { class: "pods-title" }, `Pods · requests in flight of ${limit} each`));
      parts.push(el("ul", { class: "pods", "aria-label": `pods of ${model.name}` }, ...pods.map((pod) => {
        const [status, kind] = podStatus(pod);
        const load = isNumber(pod.in_flight) ? pod.in_flight : 0;
        return el("li", { class: "pod", "data-pod": pod.name },
          el("span", { class: "pod-name" }, String(pod.name)),
          el("meter", { min: 0, max: limit, value: Math.min(load, limit), "aria-hidden": "true" }),
          el("span", { class: "pod-load", title: "requests in flight / limit per pod" }, `${load}/${limit}`),
          el("span", { class: `pod-status pod-${kind}` }, status));
      })));
    }
    return el("div", {}, ...parts);
  }

  function updateModel(card, model) {
    card.root.dataset.state = model.state;
    const badge = stateBadge(model.state);
    card.badge.replaceWith(badge);
    card.badge = badge;
    card.flags.replaceChildren(...flagsOf(model));
    card.pending.replaceChildren(...[pendingNote(model)].filter(Boolean));

    const lastWake = model.last_wake_seconds === null || model.last_wake_seconds === undefined
      ? "never"
      : seconds(model.last_wake_seconds) + (model.last_wake_from ? ` (from ${model.last_wake_from})` : "");
    const facts = [
      fact("in flight", String(model.in_flight)),
      fact("held", String(model.queued)),
      fact("last wake", lastWake),
      fact("backend", String(model.backend)),
      fact("pool", model.pool ? `${model.pool} · ${model.gpus} GPU` : "none"),
      fact("idle timeout", seconds(model.idle_timeout)),
    ];
    if (model.aliases && model.aliases.length) facts.push(fact("aliases", model.aliases.join(", ")));
    const cost = costText(model.cost);
    if (cost) facts.push(fact("cost", cost));
    const cluster = model.cluster;
    if (cluster && isNumber(cluster.in_flight)) {
      facts.push(fact("all replicas", `${cluster.in_flight} in flight · ${cluster.queued ?? 0} held`));
    }
    card.facts.replaceChildren(...facts);
    card.scale.replaceChildren(...[scaleInfo(model)].filter(Boolean));

    card.phases.replaceChildren(...[phaseBar(model)].filter(Boolean));
    card.sleep.replaceChildren(...[sleepInfo(model)].filter(Boolean));

    if (model.last_error) {
      card.error.replaceChildren(el("strong", {}, "Last error: "), model.last_error);
    } else {
      card.error.replaceChildren();
    }
    if (card.details.open && model.last_error !== card.lastError) loadLog(model.name, card.pre);
    card.lastError = model.last_error;

    // A model being removed takes no new work and is stopped once drained.
    card.wake.disabled = NOT_WAKEABLE.has(model.state) || Boolean(model.removing);
    card.stop.disabled = NOT_STOPPABLE.has(model.state) || Boolean(model.removing);
    settleNotice(model.name, model.state);
  }

  function renderModels(models) {
    const container = document.getElementById("models");
    const seen = new Set();
    models.forEach((model, index) => {
      seen.add(model.name);
      let card = cards.get(model.name);
      if (!card) {
        card = modelCard(model.name);
        cards.set(model.name, card);
      }
      updateModel(card, model);
      if (container.children[index] !== card.root) container.insertBefore(card.root, container.children[index] || null);
    });
    for (const [name, card] of cards) {
      if (!seen.has(name)) {
        card.root.remove();
        cards.delete(name);
      }
    }
  }

  // ----- pools ----------------------------------------------------------------------

  function list(items, empty) {
    if (!items.length) return el("p", { class: "muted" }, empty);
    return el("ul", {}, ...items.map((item) => el("li", {}, ...item)));
  }

  // A pool in memory mode: one bar per GPU, a segment per model sized by its share of
  // the GPU, then the free rest. The kind (awake, asleep, leaving) is told by the
  // segment's style, its tooltip and a hidden word for screen readers, never by colour alone.
  const MEMORY_KINDS = {
    awake: "awake",
    asleep: "asleep (its residue)",
    leaving: "leaving",
  };

  function percent(share) {
    if (!isNumber(share)) return "–";
    if (share > 0 && share < 0.01) return "< 1%";
    return `${Math.round(share * 100)}%`;
  }

  function memorySegment(model, scale, gpuMemory) {
    const kind = Object.hasOwn(MEMORY_KINDS, model.kind) ? model.kind : "other";
    const share = isNumber(model.share) ? model.share : 0;
    const size = isNumber(gpuMemory) ? `, ${bytes(share * gpuMemory)}` : "";
    const words = MEMORY_KINDS[kind] || String(model.kind);
    const node = el("li", {
      class: `mem mem-${kind}`, "data-model": model.name, "data-kind": String(model.kind),
      title: `${model.name}: ${words}, ${String(model.state).replace("_", " ")}, ${percent(share)} of the GPU${size}`,
    },
    el("span", { class: "mem-name" }, String(model.name)),
    el("span", { class: "visually-hidden" }, ` ${words},`),
    el("span", { class: "mem-share" }, ` ${percent(share)}`));
    // Through the CSSOM: the page's Content-Security-Policy refuses style attributes.
    node.style.flexBasis = `${(Math.max(share, 0) / scale) * 100}%`;
    return node;
  }

  function memoryBar(gpu, gpuMemory) {
    const models = Array.isArray(gpu.models) ? gpu.models : [];
    const committed = isNumber(gpu.committed) ? gpu.committed : 0;
    const free = isNumber(gpu.free) ? Math.max(gpu.free, 0) : Math.max(1 - committed, 0);
    // Shares add up to 1 at most; should they not, the bar shrinks them to fit.
    const scale = Math.max(1, committed + free);
    const bar = el("ul", { class: "memory-bar", "aria-label": `memory of GPU ${gpu.gpu}` },
      ...models.map((m) => memorySegment(m, scale, gpuMemory)));
    if (free > 0) {
      const size = isNumber(gpuMemory) ? `, ${bytes(free * gpuMemory)}` : "";
      const rest = el("li", { class: "mem mem-free", title: `free: ${percent(free)} of the GPU${size}` },
        el("span", { class: "mem-name" }, "free"), el("span", { class: "mem-share" }, ` ${percent(free)}`));
      rest.style.flexBasis = `${(free / scale) * 100}%`;
      bar.append(rest);
    }
    return el("div", { class: "memory-gpu", "data-gpu": String(gpu.gpu) },
      el("p", { class: "memory-title" },
        `GPU ${gpu.gpu}: ${percent(committed)} committed, ${percent(free)} free`),
      bar);
  }

  function memoryInfo(pool) {
    if (!Array.isArray(pool.memory) || !pool.memory.length) return null;
    const each = isNumber(pool.gpu_memory) ? ` · ${bytes(pool.gpu_memory)} per GPU` : "";
    const legend = el("ul", { class: "memory-legend", "aria-hidden": "true" },
      ...Object.entries(MEMORY_KINDS).map(([kind, words]) => el("li", {},
        el("span", { class: `swatch mem-${kind}` }), words)),
      el("li", {}, el("span", { class: "swatch mem-free" }), "free"));
    return el("section", { class: "memory", "aria-label": `GPU memory of pool ${pool.name}` },
      el("h4", {}, `GPU memory${each}`),
      ...pool.memory.map((gpu) => memoryBar(gpu, pool.gpu_memory)),
      legend);
  }

  function poolCard(pool) {
    const parts = [el("header", {}, el("h3", {}, pool.name))];
    const used = pool.gpus_in_use ?? 0;
    const id = `pool-gpus-${pool.name}`.replace(/[^A-Za-z0-9_-]/g, "_");
    parts.push(el("p", {}, el("label", { for: id }, `GPUs in use: ${used} of ${pool.gpus}`)));
    parts.push(el("meter", { id, min: 0, max: pool.gpus || 1, value: used }, `${used} of ${pool.gpus}`));
    if (pool.host_memory !== undefined && pool.host_memory !== null) {
      parts.push(el("p", {}, `Host memory for sleeping models: ${bytes(pool.host_memory_in_use ?? 0)} of ${bytes(pool.host_memory)}`));
    }
    const memory = memoryInfo(pool);
    if (memory) parts.push(memory);
    parts.push(el("h4", {}, "Holding GPUs"));
    parts.push(list(
      (pool.models || []).map((m) => [el("strong", {}, m.name), " ", stateBadge(m.state), ` ${m.gpus} GPU`]),
      "none",
    ));
    parts.push(el("h4", {}, "Waiting"));
    parts.push(list(
      (pool.waiting || []).map((w) => [
        el("strong", {}, w.name), ` ${w.queued} held, for ${seconds(w.oldest_wait_seconds)}`,
      ]),
      "nobody",
    ));
    if (Array.isArray(pool.sleeping)) {
      parts.push(el("h4", {}, "Sleeping"));
      parts.push(list(
        pool.sleeping.map((s) => [
          el("strong", {}, s.name),
          ` level ${s.level ?? "?"}, ${bytes(s.host_memory)} of host memory`,
        ]),
        "none",
      ));
    }
    return el("article", { class: "card pool", "data-pool": pool.name, "aria-label": `pool ${pool.name}` }, ...parts);
  }

  function renderPools(pools) {
    const container = document.getElementById("pools");
    if (!pools.length) {
      container.replaceChildren(el("p", { class: "muted" }, "No GPU pools are configured."));
      return;
    }
    container.replaceChildren(...pools.map(poolCard));
  }

  // ----- wake durations ---------------------------------------------------------------

  function quantile(bins, bounds, count, q) {
    let seen = 0;
    for (let i = 0; i < bins.length; i += 1) {
      seen += bins[i];
      if (seen >= q * count) return i < bounds.length ? `≤ ${bound(bounds[i])}` : `> ${bound(bounds[bounds.length - 1])}`;
    }
    return "–";
  }

  function histogram(name, series, bounds, others) {
    const bins = series.bins;
    const first = bins.findIndex((n) => n > 0);
    const last = bins.length - 1 - [...bins].reverse().findIndex((n) => n > 0);
    let lo = Math.max(0, first - 1);
    let hi = Math.min(bins.length - 1, last + 1);
    while (hi - lo < 5 && (lo > 0 || hi < bins.length - 1)) {
      if (hi < bins.length - 1) hi += 1;
      if (hi - lo < 5 && lo > 0) lo -= 1;
    }
    const shown = bins.slice(lo, hi + 1);
    const most = Math.max(...shown, 1);
    const slot = 48;
    const height = 90;
    const plot = 60;
    const width = shown.length * slot;
    const mean = series.count ? series.sum / series.count : null;
    const caption = `${name}: ${series.count} wake${series.count === 1 ? "" : "s"}, mean ${seconds(mean)}, `
      + `median ${quantile(bins, bounds, series.count, 0.5)}, p90 ${quantile(bins, bounds, series.count, 0.9)}`
      + (others.length ? `; also ${others.join(", ")}` : "");
    const chart = svg("svg", {
      viewBox: `0 0 ${width} ${height}`, class: "histogram", role: "img", "aria-label": caption,
    });
    shown.forEach((n, i) => {
      const h = n ? Math.max((n / most) * plot, 2) : 0;
      const x = i * slot;
      chart.append(svg("rect", { x: x + 6, y: 14 + plot - h, width: slot - 12, height: h, class: "bin" }));
      chart.append(svg("line", { x1: x + 2, x2: x + slot - 2, y1: 14 + plot, y2: 14 + plot, class: "axis" }));
      if (n) chart.append(svg("text", { x: x + slot / 2, y: 10 + plot - h, class: "count" }, String(n)));
      const index = lo + i;
      const upper = index < bounds.length ? bounds[index] : null;
      chart.append(svg("text", { x: x + slot / 2, y: height - 2, class: "tick" }, upper === null ? ">" + bound(bounds[bounds.length - 1]) : "≤" + bound(upper)));
    });
    return el("figure", { class: "wake-chart", "data-model": name }, el("figcaption", {}, caption), chart);
  }

  function renderWakes(models, summary) {
    const container = document.getElementById("wakes");
    const figures = [];
    const bounds = (summary && summary.bounds) || [];
    for (const model of models) {
      const outcomes = (summary && summary.models && summary.models[model.name]) || {};
      const ready = outcomes.ready;
      const others = Object.entries(outcomes)
        .filter(([outcome, s]) => outcome !== "ready" && s.count > 0)
        .map(([outcome, s]) => `${s.count} ${outcome}`);
      if (ready && ready.count > 0) {
        figures.push(histogram(model.name, ready, bounds, others));
      } else if (others.length) {
        figures.push(el("p", { class: "muted" }, `${model.name}: no successful wake; ${others.join(", ")}`));
      }
    }
    if (!figures.length) figures.push(el("p", { class: "muted" }, "No wake yet."));
    container.replaceChildren(...figures);
  }

  // ----- wiring -----------------------------------------------------------------------

  function renderReplica(ha) {
    // Several activator replicas: which one this page talks to, and who leads.
    const node = document.getElementById("replica");
    if (!ha || typeof ha !== "object" || !ha.identity) {
      node.hidden = true;
      node.textContent = "";
      return;
    }
    let text = `replica ${ha.identity}`;
    if (ha.started === false) text += " · joining";
    else if (ha.role === "leader") text += " · leader";
    else text += ` · ${ha.role || "follower"} (leader: ${ha.leader || "none yet"})`;
    node.textContent = text;
    node.hidden = false;
  }

  function render(snapshot) {
    const models = snapshot.models || [];
    renderReplica(snapshot.ha);
    renderModels(models);
    renderPools(snapshot.pools || []);
    renderWakes(models, snapshot.wake_durations);
    document.body.dataset.loaded = "true";
  }

  async function reconnectLater() {
    // EventSource gives up on an HTTP error (401 after a key change, 429 with too many
    // pages open): find out which, then try again.
    try {
      const response = await fetch("admin/models", { credentials: "same-origin" });
      if (response.status === 401) {
        toLogin();
        return;
      }
    } catch (error) {
      // activator is down or restarting: keep trying.
    }
    window.setTimeout(connect, RETRY_MS);
  }

  function connect() {
    source = new EventSource("admin/events");
    source.addEventListener("open", () => setConnection("live", "live"));
    source.addEventListener("snapshot", (event) => {
      setConnection("live", "live");
      render(JSON.parse(event.data));
    });
    source.addEventListener("closing", () => setConnection("activator is shutting down", "down"));
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        source.close();
        setConnection("disconnected, retrying…", "down");
        reconnectLater();
      } else {
        setConnection("reconnecting…", "down");
      }
    });
  }

  function firstPaint() {
    // The page comes with the snapshot of the moment it was served (a JSON data block,
    // which the Content-Security-Policy allows: it is never run): draw it at once
    // instead of an empty page until the stream's first event.
    const node = document.getElementById("snapshot");
    if (!node) return;
    try {
      render(JSON.parse(node.textContent));
    } catch (error) {
      // Not there or not JSON (an old server): the stream draws the page.
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (document.body.dataset.login === "on") document.getElementById("logout").hidden = false;
    firstPaint();
    connect();
  });

  // For tests and for poking at the page from the console: draw any snapshot.
  window.activatorUI = { render };
})();
