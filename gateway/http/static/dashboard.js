"use strict";
// The gateway's live dashboard, and the reference client for its REST API and Server-Sent Events.
//
// What it reads (all same-origin, the key in X-API-Key, or ?access_token= for EventSource):
//   GET /api/v1/ping       status without a key; components, backlog, uptime with one (polled)
//   GET /api/v1/latest     the latest reading per device (once, at connect)
//   GET /api/v1/messages   readings of the last minutes (sparklines) or of a window (device page)
//   GET /api/v1/rejects    refused packets, newest first (polled; paged back one hour)
//   GET /metrics           Prometheus text: ingest counters and active alerts (polled)
//   GET /api/v1/events     SSE: `packet` and `alert` events, live; resumed with Last-Event-ID
//
// Plain script, no build step; uPlot (vendored) draws the charts. Pages: `#/` (fleet and health)
// and `#/device/<id>` (one device's charts over a chosen window).
(function () {
  // ---- settings ----------------------------------------------------------------------------------
  const STALE_AFTER_S = 60; // a device with no reading for this long is marked stale
  const SPARK_WINDOW_S = 10 * 60; // sparklines show the last 10 minutes
  const HEALTH_WINDOW_S = 5 * 60; // the ingest and backlog charts show the last 5 minutes
  const PING_EVERY_MS = 2000;
  const METRICS_EVERY_MS = 2000;
  const REJECTS_EVERY_MS = 10000;
  const REJECT_PAGES = 4; // at most 4 × 500 rejects are read to count the last hour
  const MAX_PAGES = 10; // the device page reads at most 10 × 1000 readings per window
  // The packet carries no units: these are guessed from common measurement names.
  const UNITS = {
    temperature: "°C", temp: "°C", humidity: "%", pressure: "hPa", battery: "%", co2: "ppm",
    voltage: "V", current: "A", power: "W", energy: "kWh", lux: "lx", illuminance: "lx",
    pm25: "µg/m³", pm2_5: "µg/m³", pm10: "µg/m³", rssi: "dBm", wind_speed: "m/s", rain: "mm",
  };
  const COLOURS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777"];

  const $ = (id) => document.getElementById(id);

  // ---- state -------------------------------------------------------------------------------------
  const state = {
    key: "",
    clockOffsetMs: 0, // gateway clock minus browser clock, from /ping's `time`
    devices: new Map(), // id → {latest, lastSeenMs, series: Map(name → [[tSeconds, value], …])}
    source: null, // the EventSource
    lastEventId: null, // the last event id received: where a new stream resumes
    dropped: false, // the stream was lost and has not reopened yet
    droppedAfterId: null,
    restarted: false, // /ping's uptime went down while the stream was away
    unansweredSince: null, // when /ping first failed to answer (null: it answers)
    uptime: null,
    timers: [],
    ingest: { prev: null, points: [] }, // [tSeconds, stored/s, rejected/s]
    backlog: [], // [tSeconds, count]
    alerts: new Map(), // name → the latest `alert` event's data (summary, severity, …)
    view: { page: "fleet", deviceId: null, windowS: 3600, series: new Map(), charts: new Map(), readings: [] },
  };
  // A debugging handle (also used by the browser tests): ids of the events received, in order.
  const debug = { eventIds: [], resumes: 0 };
  window.gatewayDashboard = debug;

  // ---- formatting --------------------------------------------------------------------------------
  const nf = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });
  const nf1 = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
  const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  const dateTimeFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

  /** The gateway's "now" in milliseconds (the browser clock corrected by /ping's time). */
  const nowMs = () => Date.now() + state.clockOffsetMs;

  const NBSP = "\u00a0"; // between a number and its unit: never split over two lines

  /** "3 s", "4 min", "2 h 5 min", "3 d 4 h": a duration in words. */
  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + NBSP + "s";
    if (s < 3600) return Math.floor(s / 60) + NBSP + "min";
    if (s < 86400) return Math.floor(s / 3600) + NBSP + "h " + (Math.floor(s / 60) % 60) + NBSP + "min";
    return Math.floor(s / 86400) + NBSP + "d " + (Math.floor(s / 3600) % 24) + NBSP + "h";
  }
  const ago = (ms) => duration((nowMs() - ms) / 1000) + " ago";

  /** A time of day, with the date when it is not today. */
  function clock(ms) {
    const d = new Date(ms);
    return d.toDateString() === new Date(nowMs()).toDateString() ? timeFmt.format(d) : dateTimeFmt.format(d);
  }

  const unitOf = (name) => UNITS[name.toLowerCase()] || "";
  const label = (name) => name.replace(/[_.:-]+/g, " ");

  /** An element with a class and text (text is never parsed as HTML). */
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** A value with its unit as a <span>: "21.5 °C". */
  function valueNode(name, value) {
    const span = el("span", "value", nf.format(value));
    const unit = unitOf(name);
    if (unit) span.appendChild(el("small", "", unit));
    return span;
  }

  // ---- connection line: one sentence that says what is true now -----------------------------------
  function say(kind, text) {
    const conn = $("conn");
    conn.dataset.state = kind;
    conn.textContent = text;
  }

  // ---- REST --------------------------------------------------------------------------------------
  /** An API error: HTTP status (0: no answer) and the problem's stable `code`. */
  class ApiError extends Error {
    constructor(status, code, detail) {
      super(detail || code);
      this.status = status;
      this.code = code;
    }
  }

  /** GET a same-origin path with the key; JSON (or text) on success, ApiError otherwise. */
  async function get(path, { text = false, key = state.key } = {}) {
    let res;
    try {
      res = await fetch(path, { headers: key ? { "X-API-Key": key } : {}, cache: "no-store" });
    } catch (err) {
      throw new ApiError(0, "unreachable", "the gateway does not answer");
    }
    if (!res.ok && !(path.startsWith("/api/v1/ping") && res.status === 503)) {
      let problem = {};
      try { problem = await res.json(); } catch (_) { /* not a problem document */ }
      throw new ApiError(res.status, problem.code || "http_" + res.status, problem.detail);
    }
    return text ? res.text() : res.json();
  }

  /** Every page of a cursor-paged endpoint, newest first, until `stop(item)` or `maxPages`. */
  async function pages(path, params, { maxPages, stop = () => false }) {
    const items = [];
    let cursor = null;
    for (let i = 0; i < maxPages; i++) {
      const q = new URLSearchParams(params);
      if (cursor) q.set("cursor", cursor);
      const page = await get(path + "?" + q);
      for (const item of page.items) {
        if (stop(item)) return { items, complete: true };
        items.push(item);
      }
      cursor = page.next_cursor;
      if (!cursor) return { items, complete: true };
    }
    return { items, complete: false };
  }

  /** What to tell the user about a failed request; true when polling should stop (key refused). */
  function reportError(err) {
    if (err.status === 401) {
      stopAll();
      say("refused", "Key refused by the gateway (" + err.code + "). Check it, or make one with " +
        "`gateway apikey new --role read` and add its API_KEYS entry.");
      return true;
    }
    if (err.status === 403) {
      stopAll();
      say("refused", "This key lacks the read role (" + err.code + "): use a read, write or admin key.");
      return true;
    }
    if (err.status === 429) say("reconnecting", "Rate limited by the gateway (" + err.code + "); retrying…");
    else if (err.status === 503) say("reconnecting", "The gateway is starting, stopping or busy (" + err.code + "); retrying…");
    else if (err.status === 0) say("reconnecting", "The gateway does not answer; retrying…");
    else say("error", "Gateway error " + err.status + " (" + err.code + "): " + err.message);
    return false;
  }

  // ---- ping: header status, components, backlog --------------------------------------------------
  async function pollPing() {
    let ping;
    try {
      ping = await get("/api/v1/ping");
    } catch (err) {
      const unreachable = err.status === 0;
      setPill($("gateway-status"), unreachable ? "unreachable" : "HTTP " + err.status, "error");
      $("gateway-summary").textContent = unreachable ? "no answer from the gateway" : err.code;
      // What the health panel shows is now only the last known state: say so, and since when.
      if (state.unansweredSince === null) state.unansweredSince = nowMs();
      $("components-panel").classList.add("outdated");
      $("backlog-line").textContent = "No answer from the gateway since " + clock(state.unansweredSince) +
        ": the states above are the last known.";
      if (state.key) reportError(err);
      return;
    }
    state.unansweredSince = null;
    $("components-panel").classList.remove("outdated");
    state.clockOffsetMs = Date.parse(ping.time) - Date.now();
    setPill($("gateway-status"), ping.status, ping.status);
    if (ping.components === undefined) {
      // No key, or one /ping did not take: the public answer is all there is.
      $("gateway-summary").textContent = "gateway time " + clock(Date.parse(ping.time));
      return;
    }
    if (state.uptime !== null && ping.uptime_seconds < state.uptime) state.restarted = true;
    state.uptime = ping.uptime_seconds;
    $("gateway-summary").textContent = ["v" + ping.version, "up " + duration(ping.uptime_seconds),
      plural(ping.devices, "device"), plural(ping.sse_clients, "live client")].join(" · ");
    $("version").textContent = " · gateway " + ping.version;
    renderComponents(ping.components);
    const t = nowMs() / 1000;
    if (ping.backlog) {
      pushWindow(state.backlog, [t, ping.backlog.count], HEALTH_WINDOW_S);
      $("backlog-now").textContent = nf.format(ping.backlog.count) + " waiting";
      $("backlog-line").textContent = "Processor backlog " + plural(ping.backlog.count, "message") +
        ", oldest " + nf1.format(ping.backlog.lag_seconds) + NBSP + "s" +
        (ping.backlog.dead ? ", " + plural(ping.backlog.dead, "dead message") : "");
    } else {
      $("backlog-line").textContent = "Backlog unknown: the database does not answer.";
    }
    drawHealthCharts();
  }

  const plural = (n, word) => nf.format(n) + " " + word + (n === 1 ? "" : "s");

  /** Show a state as a coloured pill; `cls` (a state name) picks the colour. */
  function setPill(node, text, cls) {
    node.textContent = text;
    node.classList.remove(...[...node.classList].filter((c) => c !== "pill" && c !== "status"));
    if (cls) node.classList.add(cls);
  }

  function renderComponents(components) {
    const list = $("components");
    list.replaceChildren();
    for (const [name, c] of Object.entries(components)) {
      const li = el("li");
      li.dataset.component = name;
      li.appendChild(el("span", "cname", name));
      const pill = el("span", "pill " + c.state, c.state);
      li.appendChild(pill);
      const since = duration(nowMs() / 1000 - c.since);
      const words = [c.state === "ok" ? "up " + since : c.state + " for " + since];
      if (c.cause) words.push(label(c.cause));
      // Counters and flags the component reports (names as words, zeros left out).
      for (const [k, v] of Object.entries(c)) {
        if (["state", "since", "cause", "last_error"].includes(k)) continue;
        if (typeof v === "number" && v !== 0) {
          words.push(k.endsWith("_seconds") ? label(k.slice(0, -8)) + " " + nf1.format(v) + NBSP + "s" : label(k) + " " + nf.format(v));
        }
        if (v === false) words.push("not " + label(k));
      }
      const detail = el("span", "cdetail", words.join(" · "));
      if (c.last_error) detail.title = c.last_error; // admin keys only
      li.appendChild(detail);
      list.appendChild(li);
    }
  }

  // ---- metrics: ingest rate and active alerts ------------------------------------------------------
  /** Sum of every sample of `name` in Prometheus text; with `byLabel`, a map label value → value. */
  function metric(text, name, byLabel) {
    const out = byLabel ? new Map() : { total: 0 };
    const re = new RegExp("^" + name + "(\\{[^}]*\\})? (\\S+)$", "gm");
    for (const m of text.matchAll(re)) {
      const value = Number(m[2]);
      if (!byLabel) { out.total += value; continue; }
      const lm = (m[1] || "").match(new RegExp(byLabel + "=\"([^\"]*)\""));
      if (lm) out.set(lm[1], value);
    }
    return out;
  }

  async function pollMetrics() {
    let text;
    try {
      text = await get("/metrics", { text: true });
    } catch (err) {
      reportError(err);
      return;
    }
    const t = nowMs() / 1000;
    const stored = metric(text, "gateway_messages_stored_total").total;
    const rejected = metric(text, "gateway_messages_rejected_total").total;
    const prev = state.ingest.prev;
    // A counter that went down means the gateway restarted: start the rate afresh.
    if (prev && stored >= prev.stored && rejected >= prev.rejected && t > prev.t) {
      const dt = t - prev.t;
      pushWindow(state.ingest.points, [t, (stored - prev.stored) / dt, (rejected - prev.rejected) / dt],
        HEALTH_WINDOW_S);
      const last = state.ingest.points[state.ingest.points.length - 1];
      $("ingest-now").textContent = nf1.format(last[1]) + " stored/s · " + nf1.format(last[2]) + " rejected/s";
    }
    state.ingest.prev = { t, stored, rejected };
    renderAlerts(metric(text, "gateway_alert_active", "alert"));
    drawHealthCharts();
  }

  function renderAlerts(active) {
    const list = $("alerts");
    list.replaceChildren();
    const firing = [...active].filter(([, v]) => v > 0).map(([name]) => name);
    if (firing.length === 0) {
      list.appendChild(el("li", "none", "None: every built-in alert is quiet."));
      return;
    }
    for (const name of firing) {
      const seen = state.alerts.get(name); // summary and times, when its event came by SSE
      const li = el("li", "", label(name));
      if (seen && seen.state === "firing") {
        li.textContent = label(name) + ": " + seen.summary + " (since " + clock(Date.parse(seen.fired_at)) + ")";
      }
      list.appendChild(li);
    }
  }

  // ---- rejects: the last hour by reason, and the latest ones -------------------------------------
  async function pollRejects() {
    const since = nowMs() - 3600 * 1000;
    let result;
    try {
      result = await pages("/api/v1/rejects", { limit: 500 }, {
        maxPages: REJECT_PAGES, stop: (r) => Date.parse(r.received_at) < since,
      });
    } catch (err) {
      reportError(err);
      return;
    }
    const byReason = new Map();
    for (const r of result.items) byReason.set(r.reason, (byReason.get(r.reason) || 0) + 1);
    $("rejects-total").textContent = nf.format(result.items.length) + (result.complete ? "" : "+");
    const reasons = $("reject-reasons");
    reasons.replaceChildren();
    if (byReason.size === 0) reasons.appendChild(el("li", "none", "None: every packet was valid."));
    for (const [reason, n] of [...byReason].sort((a, b) => b[1] - a[1])) {
      const li = el("li");
      li.appendChild(el("span", "", label(reason)));
      li.appendChild(el("b", "", nf.format(n)));
      reasons.appendChild(li);
    }
    const list = $("reject-list");
    list.replaceChildren();
    for (const r of result.items.slice(0, 5)) list.appendChild(rejectItem(r));
  }

  /** One reject in words: when, from where, why (each field error), and the payload on demand. */
  function rejectItem(r) {
    const li = el("li");
    li.appendChild(el("div", "", clock(Date.parse(r.received_at)) + " · " + (r.topic || r.source)));
    const why = (r.errors || []).map((e) => ((e.loc || []).join(".") || "packet") + ": " + e.msg);
    li.appendChild(el("div", "why", label(r.reason) + (why.length ? " — " + why.slice(0, 3).join("; ") : "")));
    const details = el("details");
    details.appendChild(el("summary", "", "payload (" + nf.format(r.payload.length) + " characters)"));
    details.appendChild(el("pre", "", r.payload.slice(0, 600)));
    li.appendChild(details);
    return li;
  }

  // ---- readings: the fleet's state and the series behind the sparklines -------------------------
  function device(id) {
    let d = state.devices.get(id);
    if (!d) {
      d = { latest: null, lastSeenMs: 0, series: new Map(), ids: new Map(), card: null };
      state.devices.set(id, d);
    }
    return d;
  }

  /**
   * Take one reading (from REST or SSE) into the fleet state; older readings only extend series.
   * The stream opens before the REST reads, so a reading may come both ways: its id counts once.
   */
  function takeReading(r) {
    const d = device(r.device_id);
    const t = Date.parse(r.timestamp) / 1000;
    if (d.ids.has(r.id)) return;
    d.ids.set(r.id, t);
    const seen = Date.parse(r.received_at);
    if (!d.latest || seen >= d.lastSeenMs) {
      d.latest = r;
      d.lastSeenMs = seen;
    }
    for (const [name, value] of Object.entries(r.measurements)) {
      let s = d.series.get(name);
      if (!s) d.series.set(name, (s = []));
      // Mostly appended in order; a replayed or older reading is put in its place.
      if (s.length === 0 || s[s.length - 1][0] <= t) s.push([t, value]);
      else s.splice(s.findIndex((p) => p[0] > t), 0, [t, value]);
    }
    d.dirty = true;
  }

  /** Drop sparkline points older than the window. */
  function trimSeries() {
    const from = nowMs() / 1000 - SPARK_WINDOW_S;
    for (const d of state.devices.values()) {
      for (const s of d.series.values()) {
        let i = 0;
        while (i < s.length && s[i][0] < from) i++;
        if (i) s.splice(0, i);
      }
      for (const [id, t] of d.ids) if (t < from) d.ids.delete(id);
    }
  }

  /** The readings of the last sparkline window, oldest first, then the latest per device. */
  async function loadFleet() {
    const start = new Date(nowMs() - SPARK_WINDOW_S * 1000).toISOString();
    const recent = await pages("/api/v1/messages", { limit: 1000, start_time: start }, { maxPages: 5 });
    recent.items.reverse().forEach(takeReading);
    const latest = await get("/api/v1/latest");
    Object.values(latest.devices).forEach(takeReading);
  }

  // ---- fleet view: one card per device -----------------------------------------------------------
  function renderFleet() {
    const ids = [...state.devices.keys()].sort();
    $("no-devices").hidden = ids.length > 0;
    $("device-count").textContent = ids.length ? "(" + ids.length + ")" : "";
    $("fleet-hint").textContent = "sparklines: last " + duration(SPARK_WINDOW_S) +
      " · stale after " + duration(STALE_AFTER_S) + " without a reading";
    const cards = $("cards");
    ids.forEach((id, i) => {
      const d = state.devices.get(id);
      if (!d.card) d.card = makeCard(id);
      if (cards.children[i] !== d.card) cards.insertBefore(d.card, cards.children[i] || null);
      updateCard(d);
    });
  }

  function makeCard(id) {
    const card = el("article", "card");
    card.dataset.device = id;
    const head = el("div", "card-head");
    const link = el("a", "", id);
    link.href = "#/device/" + encodeURIComponent(id);
    head.appendChild(link);
    head.appendChild(el("span", "pill status"));
    card.appendChild(head);
    const meta = el("div", "card-meta");
    const battery = el("span", "battery");
    const bar = el("span", "bar");
    bar.appendChild(el("i"));
    battery.appendChild(bar);
    battery.appendChild(el("span", "battery-text"));
    meta.appendChild(battery);
    meta.appendChild(el("span", "seen"));
    card.appendChild(meta);
    card.appendChild(el("div", "measures"));
    return card;
  }

  function updateCard(d) {
    const card = d.card;
    const r = d.latest;
    const stale = nowMs() - d.lastSeenMs > STALE_AFTER_S * 1000;
    card.classList.toggle("stale", stale);
    const pill = card.querySelector(".status");
    setPill(pill, stale ? "stale" : r.status, stale ? "stale" : r.status);
    pill.title = stale ? "last status: " + r.status : "";
    const battery = card.querySelector(".battery");
    battery.hidden = r.battery === null || r.battery === undefined;
    if (!battery.hidden) {
      battery.querySelector("i").style.width = Math.max(0, Math.min(100, r.battery)) * 0.22 + "px";
      battery.classList.toggle("low", r.battery < 20);
      battery.querySelector(".battery-text").textContent = nf.format(Math.round(r.battery)) + " %";
    }
    const seen = card.querySelector(".seen");
    seen.textContent = "seen " + ago(d.lastSeenMs);
    seen.title = "received " + dateTimeFmt.format(new Date(d.lastSeenMs)) + ", seq " + (r.seq ?? "–");
    const box = card.querySelector(".measures");
    if (d.dirty) {
      d.dirty = false;
      for (const name of Object.keys(r.measurements).sort()) {
        let row = box.querySelector('[data-measure="' + CSS.escape(name) + '"]');
        if (!row) {
          row = el("div", "measure");
          row.dataset.measure = name;
          row.appendChild(el("span", "name", label(name)));
          row.appendChild(el("span", "value"));
          const canvas = el("canvas");
          canvas.setAttribute("role", "img");
          canvas.setAttribute("aria-label", label(name) + " over the last " + duration(SPARK_WINDOW_S));
          row.appendChild(canvas);
          box.appendChild(row);
        }
        row.replaceChild(valueNode(name, r.measurements[name]), row.querySelector(".value"));
      }
    }
    // Redrawn every time, new reading or not: time moves the line to the left.
    for (const row of box.children) sparkline(row.querySelector("canvas"), d.series.get(row.dataset.measure) || [], COLOURS[0]);
  }

  /** A small line chart of [[t, v], …] over the sparkline window, drawn straight on a canvas. */
  function sparkline(canvas, points, colour) {
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 120;
    const h = canvas.clientHeight || 34;
    if (canvas.width !== w * ratio || canvas.height !== h * ratio) {
      canvas.width = w * ratio; // the backing store, in device pixels (sharp on HiDPI screens)
      canvas.height = h * ratio;
    }
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    if (points.length < 2) return;
    // The window, or less while a device is new (at least a minute): its line fills the box.
    const t1 = nowMs() / 1000;
    const t0 = Math.min(Math.max(t1 - SPARK_WINDOW_S, points[0][0]), t1 - 60);
    let lo = Infinity, hi = -Infinity;
    for (const [, v] of points) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    if (hi === lo) { hi += 1; lo -= 1; }
    const x = (t) => ((t - t0) / (t1 - t0)) * (w - 2) + 1;
    const y = (v) => h - 3 - ((v - lo) / (hi - lo)) * (h - 6);
    g.beginPath();
    points.forEach(([t, v], i) => (i ? g.lineTo(x(t), y(v)) : g.moveTo(x(t), y(v))));
    g.strokeStyle = colour;
    g.lineWidth = 1.5;
    g.stroke();
    const [lt, lv] = points[points.length - 1];
    g.fillStyle = colour;
    g.beginPath();
    g.arc(x(lt), y(lv), 2.2, 0, 2 * Math.PI);
    g.fill();
  }

  // ---- uPlot charts ------------------------------------------------------------------------------
  /**
   * A uPlot time chart in `box`, sized to its box and kept so. `series`: [{label, colour, fill}];
   * `windowS`: a function giving the seconds shown up to now (the x axis always ends now, so a
   * quiet series is seen to be quiet); `legend`: uPlot's legend with the values under the cursor.
   */
  function chart(box, series, { height, windowS, legend = false, small = false }) {
    const font = (small ? "11px " : "12px ") + "system-ui, sans-serif";
    const axis = { stroke: "#66758a", font, grid: { stroke: "#eef1f5" }, ticks: { stroke: "#e2e7ee", size: 4 } };
    const opts = {
      width: box.clientWidth || 300,
      height,
      legend: { show: legend },
      cursor: { drag: { x: false, y: false } },
      scales: {
        x: { time: true, range: () => { const t = nowMs() / 1000; return [t - windowS(), t]; } },
      },
      axes: [
        Object.assign({}, axis, { size: small ? 26 : 40, space: small ? 45 : 80 }),
        // Wide enough for the longest tick label ("1,002.25"), whatever the values.
        Object.assign({}, axis, {
          size: (u, values) => 14 + 7 * Math.max(3, ...(values || []).map((v) => String(v).length)),
        }),
      ],
      series: [{}, ...series.map((s) => ({
        label: s.label, stroke: s.colour, width: 1.6, fill: s.fill, points: { show: false },
        value: (u, v) => (v === null || v === undefined ? "–" : nf.format(v)),
      }))],
    };
    const u = new uPlot(opts, [[], ...series.map(() => [])], box);
    new ResizeObserver(() => u.setSize({ width: box.clientWidth, height: opts.height })).observe(box);
    return u;
  }

  /** Column data for uPlot from rows [[t, a, b…], …]. */
  const columns = (rows, n) => Array.from({ length: n }, (_, i) => rows.map((r) => r[i]));

  let ingestChart = null;
  let backlogChart = null;
  function drawHealthCharts() {
    if ($("fleet-view").hidden) return;
    if (!ingestChart) {
      const mini = { height: 100, windowS: () => HEALTH_WINDOW_S, small: true };
      ingestChart = chart($("ingest-chart"), [
        { label: "stored/s", colour: "#2563eb", fill: "rgba(37,99,235,.08)" },
        { label: "rejected/s", colour: "#dc2626" },
      ], mini);
      backlogChart = chart($("backlog-chart"), [{ label: "backlog", colour: "#d97706", fill: "rgba(217,119,6,.1)" }],
        mini);
    }
    ingestChart.setData(columns(state.ingest.points, 3));
    backlogChart.setData(columns(state.backlog, 2));
  }

  function pushWindow(rows, row, windowS) {
    rows.push(row);
    while (rows.length && rows[0][0] < row[0] - windowS) rows.shift();
  }

  // ---- device page -------------------------------------------------------------------------------
  async function showDevice(id) {
    const v = state.view;
    v.deviceId = id;
    v.series = new Map();
    v.seen = new Set(); // reading ids shown: the stream and the REST read may both bring one
    v.readings = [];
    v.charts.forEach((c) => c.destroy());
    v.charts = new Map();
    $("device-charts").replaceChildren();
    $("device-title").textContent = id;
    $("device-note").textContent = "Loading…";
    const start = new Date(nowMs() - v.windowS * 1000).toISOString();
    let result;
    try {
      result = await pages("/api/v1/messages", { device_id: id, start_time: start, limit: 1000 },
        { maxPages: MAX_PAGES });
    } catch (err) {
      $("device-note").textContent = "Could not read the readings: " + err.message;
      reportError(err);
      return;
    }
    if (v.deviceId !== id) return; // the user went elsewhere meanwhile
    // Live readings that came while we read are in already: merge in time order.
    const live = v.readings.slice().reverse();
    v.series = new Map();
    v.seen = new Set();
    v.readings = [];
    const merged = result.items.reverse().concat(live.filter((r) => !result.items.some((x) => x.id === r.id)));
    merged.sort((a, b) => Date.parse(a.timestamp) - Date.parse(b.timestamp)).forEach(addToDeviceView);
    $("device-note").textContent = result.items.length === 0
      ? "No readings in the last " + duration(v.windowS) + "."
      : plural(result.items.length, "reading") + " in the last " + duration(v.windowS) +
        (result.complete ? "" : " (the latest " + nf.format(result.items.length) + " only)") +
        "; new ones are added live.";
    drawDevice();
  }

  /** Add a reading of the device shown (oldest first) to its chart series and table. */
  function addToDeviceView(r) {
    const v = state.view;
    if (v.seen.has(r.id)) return;
    v.seen.add(r.id);
    const t = Date.parse(r.timestamp) / 1000;
    const values = Object.assign({}, r.measurements);
    if (r.battery !== null && r.battery !== undefined) values.battery = r.battery;
    for (const [name, value] of Object.entries(values)) {
      if (!v.series.has(name)) v.series.set(name, []);
      v.series.get(name).push([t, value]);
    }
    v.readings.unshift(r);
    v.readings.length = Math.min(v.readings.length, 10);
  }

  function drawDevice() {
    const v = state.view;
    const from = nowMs() / 1000 - v.windowS;
    const box = $("device-charts");
    [...v.series.keys()].sort().forEach((name, i) => {
      const rows = v.series.get(name);
      while (rows.length && rows[0][0] < from) rows.shift();
      let u = v.charts.get(name);
      if (!u) {
        const panel = el("div", "chart-panel");
        panel.dataset.measure = name;
        const unit = unitOf(name);
        panel.appendChild(el("h3", "", label(name) + (unit ? " (" + unit + ")" : "")));
        const chartBox = el("div", "chart-box");
        panel.appendChild(chartBox);
        box.appendChild(panel);
        const colour = COLOURS[i % COLOURS.length];
        u = chart(chartBox, [{ label: label(name), colour }], { height: 220, windowS: () => v.windowS, legend: true });
        v.charts.set(name, u);
      }
      u.setData(columns(rows, 2));
    });
    const d = state.devices.get(v.deviceId);
    if (d && d.latest) {
      const stale = nowMs() - d.lastSeenMs > STALE_AFTER_S * 1000;
      setPill($("device-pill"), stale ? "stale" : d.latest.status, stale ? "stale" : d.latest.status);
      $("device-meta").textContent = "seen " + ago(d.lastSeenMs) +
        (d.latest.battery != null ? " · battery " + nf.format(Math.round(d.latest.battery)) + " %" : "");
    }
    renderReadings();
  }

  function renderReadings() {
    const v = state.view;
    const names = [...new Set(v.readings.flatMap((r) => Object.keys(r.measurements)))].sort();
    const head = el("tr");
    ["received", "device time", "seq", "status", ...names.map((n) => label(n) + (unitOf(n) ? " (" + unitOf(n) + ")" : "")),
      "battery (%)"].forEach((h) => head.appendChild(el("th", "", h)));
    $("readings-head").replaceChildren(head);
    $("readings-body").replaceChildren(...v.readings.map((r) => {
      const tr = el("tr");
      const cells = [clock(Date.parse(r.received_at)), clock(Date.parse(r.timestamp)), r.seq ?? "–", r.status,
        ...names.map((n) => (n in r.measurements ? nf.format(r.measurements[n]) : "–")),
        r.battery != null ? nf.format(r.battery) : "–"];
      cells.forEach((c) => tr.appendChild(el("td", "", String(c))));
      return tr;
    }));
  }

  // ---- Server-Sent Events ------------------------------------------------------------------------
  /**
   * Open the event stream. The browser itself reconnects after a network drop and sends
   * Last-Event-ID, so the gateway replays what was missed. A stream the gateway refuses (401, 403,
   * 429, 503 while it starts) is closed for good by EventSource: then we ask a REST endpoint why,
   * say so, and open a new stream from our last id with `?last_event_id=`.
   */
  function openStream() {
    const q = new URLSearchParams({ access_token: state.key });
    if (state.lastEventId !== null) q.set("last_event_id", state.lastEventId);
    const source = new EventSource("/api/v1/events?" + q);
    state.source = source;
    source.onopen = async () => {
      if (!state.dropped) {
        if ($("conn").dataset.state !== "resumed") say("live", "Live: following events as they happen.");
        return;
      }
      // Back after a drop: the gateway replays every event after the last id we had. Ask /ping
      // first, so the sentence can say whether the gateway restarted (its uptime went down).
      state.dropped = false;
      const after = state.droppedAfterId;
      await pollPing();
      debug.resumes++;
      say("resumed", (state.restarted ? "The gateway restarted; resumed" : "Reconnected; resumed") +
        (after === null ? "" : " after event #" + after) + " at " + clock(nowMs()) + ", missed events replayed.");
      state.restarted = false;
    };
    source.onerror = () => {
      if (state.source !== source) return;
      if (!state.dropped) {
        state.dropped = true;
        state.droppedAfterId = state.lastEventId;
      }
      if (source.readyState === EventSource.CONNECTING) {
        say("reconnecting", "Connection to the gateway lost; reconnecting…");
        return;
      }
      // Closed for good: find out why before saying anything.
      source.close();
      get("/api/v1/latest").then(
        () => retryStream(2000, "The gateway refused the stream for now; retrying…"),
        (err) => { if (!reportError(err)) retryStream(2000); },
      );
    };
    source.addEventListener("packet", (ev) => {
      onEventId(ev);
      const r = JSON.parse(ev.data);
      takeReading(r);
      if (state.view.page === "device" && r.device_id === state.view.deviceId) {
        addToDeviceView(r);
        scheduleDeviceDraw();
      }
    });
    source.addEventListener("alert", (ev) => {
      onEventId(ev);
      const a = JSON.parse(ev.data);
      state.alerts.set(a.alert, a);
    });
    source.addEventListener("reset", (ev) => {
      // The gateway no longer keeps the events after our id: reload what we show.
      onEventId(ev);
      say("resumed", "Some events were too old to replay; reloaded the latest readings.");
      loadFleet().catch(reportError);
    });
  }

  function retryStream(ms, text) {
    if (text) say("reconnecting", text);
    const timer = setTimeout(() => { if (state.key) openStream(); }, ms);
    state.timers.push(timer);
  }

  function onEventId(ev) {
    const id = Number(ev.lastEventId);
    state.lastEventId = id;
    debug.eventIds.push(id);
    if (debug.eventIds.length > 20000) debug.eventIds.splice(0, 10000);
  }

  let deviceDrawPending = false;
  function scheduleDeviceDraw() {
    if (deviceDrawPending) return;
    deviceDrawPending = true;
    requestAnimationFrame(() => { deviceDrawPending = false; drawDevice(); });
  }

  // ---- navigation and start-up -------------------------------------------------------------------
  function route() {
    const m = location.hash.match(/^#\/device\/(.+)$/);
    const connected = Boolean(state.key);
    $("welcome").hidden = connected;
    state.view.page = m ? "device" : "fleet";
    $("fleet-view").hidden = !connected || Boolean(m);
    $("device-view").hidden = !connected || !m;
    if (connected && m) showDevice(decodeURIComponent(m[1]));
    if (connected && !m) { renderFleet(); drawHealthCharts(); }
  }

  function stopAll() {
    state.timers.forEach((t) => { clearInterval(t); clearTimeout(t); });
    state.timers = [];
    if (state.source) state.source.close();
    state.source = null;
  }

  function every(ms, fn) {
    fn();
    state.timers.push(setInterval(fn, ms));
  }

  async function connect(key) {
    stopAll();
    state.key = key;
    state.devices.forEach((d) => d.card && d.card.remove());
    state.devices.clear();
    state.lastEventId = null;
    say("checking", "Checking the key…");
    try {
      await get("/api/v1/latest"); // proves the key: a refused one ends here
    } catch (err) {
      if (reportError(err)) {
        state.key = "";
        route();
        every(PING_EVERY_MS, pollPing);
      } else {
        // Not the key's fault (the gateway is down or starting): try again.
        state.timers.push(setTimeout(() => connect(key), 3000));
      }
      return;
    }
    // The stream first, then what is stored: nothing falls between the two (ids dedupe).
    openStream();
    try {
      await loadFleet();
    } catch (err) {
      reportError(err);
    }
    route();
    every(PING_EVERY_MS, pollPing);
    every(METRICS_EVERY_MS, pollMetrics);
    every(REJECTS_EVERY_MS, pollRejects);
    // Once a second: "seen N s ago", stale marks and sparklines move on.
    every(1000, () => {
      trimSeries();
      if (state.view.page === "fleet") renderFleet();
      else drawDevice();
    });
  }

  $("window").addEventListener("change", () => {
    state.view.windowS = Number($("window").value);
    if (state.view.page === "device") showDevice(state.view.deviceId);
  });
  window.addEventListener("hashchange", route);
  $("keyform").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key").value.trim();
    sessionStorage.setItem("gateway-key", key);
    if (key) connect(key);
  });

  // A link with the key in its fragment (`gateway demo` prints one: #key=...) signs in at once.
  // The fragment never reaches the server or its logs; it is taken out of the address bar so the
  // key is not left in the history or shared with a copied link.
  const fromLink = location.hash.match(/^#key=([A-Za-z0-9_\-]+)$/);
  if (fromLink) {
    sessionStorage.setItem("gateway-key", fromLink[1]);
    history.replaceState(null, "", location.pathname + location.search);
  }
  const saved = sessionStorage.getItem("gateway-key") || "";
  $("key").value = saved;
  if (saved) {
    connect(saved);
  } else {
    route();
    say("idle", "Not connected: enter an API key to see devices and health.");
    every(PING_EVERY_MS, pollPing);
  }
})();
