"use strict";
// The live dashboard: ping + latest readings over fetch, live events over EventSource.
(function () {
  const $ = (id) => document.getElementById(id);
  const devices = new Map();
  let source = null;
  let timer = null;

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
  }

  function renderDevices() {
    const body = $("devices").tBodies[0];
    body.replaceChildren();
    [...devices.keys()].sort().forEach((id) => {
      const r = devices.get(id);
      const row = document.createElement("tr");
      cell(row, id);
      cell(row, r.timestamp || r.received_at || "");
      cell(row, r.status || "", r.status);
      cell(row, JSON.stringify(r.measurements || {}));
      body.appendChild(row);
    });
  }

  function log(line) {
    const el = $("log");
    el.textContent = line + "\n" + el.textContent.slice(0, 20000);
  }

  async function getJson(path, key) {
    const res = await fetch(path, { headers: { "X-API-Key": key }, cache: "no-store" });
    if (!res.ok) throw new Error(path + ": " + res.status);
    return res.json();
  }

  async function refresh(key) {
    try {
      const ping = await getJson("/api/v1/ping", key);
      $("status").textContent = ping.status;
      $("status").className = ping.status;
      const body = $("components").tBodies[0];
      body.replaceChildren();
      Object.entries(ping.components || {}).forEach(([name, c]) => {
        const row = document.createElement("tr");
        cell(row, name);
        cell(row, c.state, c.state);
        const rest = Object.assign({}, c);
        delete rest.state;
        cell(row, JSON.stringify(rest));
        body.appendChild(row);
      });
      const latest = await getJson("/api/v1/latest", key);
      Object.entries(latest.devices || {}).forEach(([id, r]) => devices.set(id, r));
      renderDevices();
    } catch (err) {
      $("status").textContent = String(err.message || err);
      $("status").className = "error";
    }
  }

  function connect(key) {
    if (source) source.close();
    if (timer) clearInterval(timer);
    refresh(key);
    timer = setInterval(() => refresh(key), 5000);
    source = new EventSource("/api/v1/events?access_token=" + encodeURIComponent(key));
    source.onopen = () => { $("conn").textContent = "live"; };
    source.onerror = () => { $("conn").textContent = "reconnecting…"; };
    const onEvent = (ev) => {
      log(ev.type + " #" + ev.lastEventId + " " + ev.data);
      try {
        const data = JSON.parse(ev.data);
        const reading = data.data && data.data.device_id ? data.data : data;
        if (ev.type === "packet" && reading.device_id) {
          devices.set(reading.device_id, reading);
          renderDevices();
        }
      } catch (_) { /* not JSON: shown in the log only */ }
    };
    ["packet", "alert", "reset", "message"].forEach((t) => source.addEventListener(t, onEvent));
  }

  $("key").value = sessionStorage.getItem("gateway-key") || "";
  $("keyform").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key").value.trim();
    sessionStorage.setItem("gateway-key", key);
    if (key) connect(key);
  });
  if ($("key").value) connect($("key").value);
})();
