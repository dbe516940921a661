// edge-agent dashboard: the fleet at a glance with its federated learning jobs, and per device
// live charts from the endpoint's JSON API (docs/dashboard.md). Read-only; polls every POLL_MS;
// builds the DOM with textContent only (device data is never parsed as HTML). window.dashboard
// exposes the charts for tests.
"use strict";
(function () {
  const POLL_MS = 5000;
  const WINDOWS = [[300, "5 min"], [900, "15 min"], [3600, "1 h"], [21600, "6 h"], [86400, "24 h"], [604800, "7 d"]];
  const SILENT_AFTER = 300; // seconds without contact before a device counts as silent
  const PALETTE = ["#4ea1ff", "#a371f7", "#3fb950", "#e3b341", "#f778ba", "#39c5cf", "#f0883e", "#8b98a9"];
  const LINK_COLORS = { high: "#3fb950", medium: "#d29922", low: "#f0883e", offline: "#f85149" };
  const RED = "#f85149", GREEN = "#3fb950", AMBER = "#d29922";
  const AXIS = { stroke: "#8b98a9", grid: { stroke: "#232b36", width: 1 }, ticks: { stroke: "#2a3341", width: 1 } };

  const state = {
    view: null, device: null, window: 900, timer: null, polls: 0,
    since: 0, until: 0, episodes: [], marks: [], linkStates: [],
  };
  const charts = new Map(); // name -> uPlot
  window.dashboard = { charts: charts, state: state };

  // -- small helpers -------------------------------------------------------------------------

  function $(id) { return document.getElementById(id); }

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined) return "–";
    const d = digits === undefined ? 3 : digits;
    return Math.abs(v) >= 1000 ? v.toFixed(0) : Number(v.toPrecision(d)).toString();
  }

  function ago(t, now) {
    if (!t) return "never";
    const s = Math.max(0, now - t);
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 172800) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }

  function clock(t) {
    const d = new Date(t * 1000);
    return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  async function api(path) {
    const response = await fetch(path, { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(path + ": " + response.status + " " + response.statusText);
    return response.json();
  }

  function setStatus(ok, text) {
    const s = $("status");
    s.className = "status " + (ok ? "live" : "error");
    s.textContent = text;
  }

  function linkChip(link) {
    const st = link && link.state;
    return el("i", { class: "chip " + (st || ""), text: st || "unknown" });
  }

  function linkText(link) {
    if (!link) return "";
    const parts = [];
    if (link.rtt_ms !== null && link.rtt_ms !== undefined) parts.push("rtt " + fmt(link.rtt_ms) + " ms");
    if (link.loss !== null && link.loss !== undefined) parts.push("loss " + fmt(link.loss * 100, 2) + " %");
    return parts.join(" · ");
  }

  function modelsText(models) {
    const out = [];
    for (const [slot, m] of Object.entries(models || {})) {
      let s = slot + ": " + (m.name || "?");
      if (m.version) s += " " + m.version;
      if (m.status && m.status !== "active") s += " (" + m.status + ")";
      out.push(s);
    }
    return out.length ? out.join(" · ") : "–";
  }

  function healthList(sensors) {
    const span = el("span");
    for (const [name, health] of Object.entries(sensors || {})) {
      span.append(el("span", { class: "health " + (health || ""), title: health || "" }, name));
    }
    return span;
  }

  function condition(d, now) {
    if (d.alert_active) return "alerting";
    if (!d.last_seen || now - d.last_seen > SILENT_AFTER) return "silent";
    return "ok";
  }

  // -- fleet -----------------------------------------------------------------------------------

  async function pollFleet() {
    // the learning jobs' own failure is said in their section: the fleet view goes on
    const [data, learning] = await Promise.all([
      api("/api/fleet"),
      api("/api/learning").catch((err) => ({ failed: String(err.message || err) })),
    ]);
    const now = data.now;
    const cards = $("fleet");
    cards.replaceChildren();
    let alerting = 0, silent = 0, offline = 0;
    for (const d of data.devices) {
      const cond = condition(d, now);
      if (cond === "alerting") alerting++;
      if (cond === "silent") silent++;
      if (d.link && d.link.state === "offline") offline++;
      const last = d.last_alert;
      cards.append(el("a", { class: "card " + cond, href: "#/device/" + encodeURIComponent(d.id), "data-device": d.id },
        el("div", { class: "row" },
          el("span", { class: "name", text: d.id }),
          el("span", { class: "badge " + cond, text: cond === "ok" ? "ok" : cond })),
        el("div", { class: "kv" }, "last seen ", el("b", { text: ago(d.last_seen, now) }),
          " · queue ", el("b", { text: d.queue_depth === null ? "–" : fmt(d.queue_depth, 6) })),
        el("div", { class: "kv" }, "link ", linkChip(d.link), " ", linkText(d.link)),
        el("div", { class: "kv" }, "models ", el("b", { text: modelsText(d.models) })),
        el("div", { class: "kv" }, healthList(d.sensors)),
        el("div", { class: "kv" }, "alerts 24 h ", el("b", { text: String(d.alerts_24h) }),
          last ? " · last " + last.kind + " " + ago(last.t, now) + ", score " + fmt(last.score) +
            (last.fault ? " (" + last.fault + ")" : "") : "")));
    }
    $("fleet-empty").hidden = data.devices.length > 0;
    const summary = $("fleet-summary");
    summary.replaceChildren(
      tile(data.devices.length, "devices", ""),
      tile(alerting, "alerting", alerting ? "bad" : "ok"),
      tile(silent, "silent > 5 min", silent ? "warn" : "ok"),
      tile(offline, "link offline", offline ? "bad" : "ok"));
    renderLearning(learning);
  }

  // -- learning --------------------------------------------------------------------------------

  function ahead(t, now) {
    if (t === null || t === undefined) return "–";
    const s = t - now;
    if (s <= 0) return "passed";
    if (s < 90) return "in " + Math.round(s) + " s";
    if (s < 5400) return "in " + Math.round(s / 60) + " min";
    if (s < 172800) return "in " + Math.round(s / 3600) + " h";
    return "in " + Math.round(s / 86400) + " d";
  }

  function progress(j) {
    if (j.round === null || j.rounds === null) return "–";
    if (j.round === 0) return "not started";
    const where = j.round <= j.rounds ? "round " + j.round + "/" + j.rounds
      : "round " + j.round + ", the check of round " + j.rounds + "'s model";
    return where + (j.open ? " open" : "");
  }

  function outText(out) {
    const parts = Object.entries(out || {}).map(([why, n]) => why + " " + n);
    return parts.length ? parts.join(", ") : "–";
  }

  function attemptText(a, now) {
    if (!a) return "–";
    let s = a.uploads + "/" + (a.selected === null ? "?" : a.selected) + " uploads";
    if (a.attempt > 1) s += " · attempt " + a.attempt + " of " + a.attempts;
    return s + " · deadline " + ahead(a.deadline, now);
  }

  function verdict(passed) {
    return el("span", { class: "verdict " + (passed ? "passed" : "failed"), text: passed ? "passed" : "failed" });
  }

  function checkCell(c) {
    if (!c) return el("td", { text: "–" });
    return el("td", {}, verdict(c.passed), " round " + c.round + "'s model" +
      (c.margin === null ? ", no device answered" : ", margin " + (c.margin >= 0 ? "+" : "") + fmt(c.margin) + " over " + c.devices + " devices"));
  }

  function roundsCell(j) {
    const td = el("td");
    if (j.rounds_closed > j.history.length) td.append(el("span", { class: "round", text: "… " }));
    for (const h of j.history) {
      const cls = h.check === null ? "" : h.check ? " passed" : " failed";
      td.append(el("span", { class: "round" + cls, title: h.check === null ? null : "check " + (h.check ? "passed" : "failed") },
        h.round + ": " + h.uploads + "/" + h.selected, h.check === null ? null : el("b", { text: h.check ? " ✓" : " ✗" }),
        h.version ? " → " + h.version : null));
    }
    if (!j.history.length) td.textContent = "–";
    return td;
  }

  function renderLearning(data) {
    const body = $("learning").querySelector("tbody");
    if (data.failed) { // the jobs shown stay as they were; the note says why they are not new
      $("learning-note").textContent = "not updated: " + data.failed;
      $("learning-note").classList.add("error");
      $("learning-view").hidden = false;
      return;
    }
    $("learning-note").classList.remove("error");
    body.replaceChildren();
    for (const j of data.jobs) {
      if (!("state" in j)) { // a job whose stored document does not read
        body.append(el("tr", { class: "damaged", "data-job": String(j.id) }, el("td", { text: String(j.id) }),
          el("td", { colspan: "8" }, el("span", { class: "error", text: j.error }))));
        continue;
      }
      body.append(el("tr", { class: j.state || "", "data-job": String(j.id) },
        el("td", { text: String(j.id) }),
        el("td", { text: (j.model || "?") + " from " + (j.base || "?") }),
        el("td", {}, el("span", { class: "state " + (j.state || ""), text: j.state || "?" }),
          j.error ? el("span", { class: "error", text: j.error }) : null),
        el("td", { text: progress(j) }),
        el("td", { text: attemptText(j.attempt, data.now) }),
        el("td", { text: j.attempt ? outText(j.attempt.out) : "–" }),
        checkCell(j.check),
        el("td", { text: j.version || "–" }),
        roundsCell(j)));
    }
    $("learning-view").hidden = data.jobs.length === 0;
    $("learning-note").textContent = data.truncated ? "the newest " + data.jobs.length + " jobs" : "";
  }

  function tile(n, label, cls) {
    return el("div", { class: "tile " + cls }, el("div", { class: "n", text: String(n) }), el("div", { class: "l", text: label }));
  }

  // -- charts ----------------------------------------------------------------------------------

  function width(container) {
    return Math.max(240, container.clientWidth || 600);
  }

  function xRange() { return [state.since, state.until]; }

  function drawAlerts(u) {
    // shaded alert episodes and a line at each raise (red) and clear (green)
    const ctx = u.ctx, box = u.bbox;
    ctx.save();
    ctx.beginPath();
    ctx.rect(box.left, box.top, box.width, box.height);
    ctx.clip();
    for (const ep of state.episodes) {
      const x0 = u.valToPos(ep.from, "x", true), x1 = u.valToPos(ep.to, "x", true);
      ctx.fillStyle = "rgba(248, 81, 73, 0.13)";
      ctx.fillRect(x0, box.top, Math.max(2, x1 - x0), box.height);
    }
    for (const m of state.marks) {
      const x = Math.round(u.valToPos(m.t, "x", true)) + 0.5;
      ctx.strokeStyle = m.kind === "clear" ? GREEN : RED;
      ctx.lineWidth = m.kind === "clear" ? 1 : 2;
      ctx.setLineDash(m.kind === "clear" ? [4, 3] : []);
      ctx.beginPath();
      ctx.moveTo(x, box.top);
      ctx.lineTo(x, box.top + box.height);
      ctx.stroke();
    }
    ctx.restore();
  }

  function drawLinkStates(u) {
    // the link state as a coloured strip along the bottom of the plot
    const ctx = u.ctx, box = u.bbox, h = Math.round(8 * devicePixelRatio);
    const spans = state.linkStates;
    ctx.save();
    for (let i = 0; i < spans.length; i++) {
      const from = spans[i].t, to = i + 1 < spans.length ? spans[i + 1].t : Math.min(state.until, state.now || state.until);
      const x0 = Math.max(box.left, u.valToPos(from, "x", true));
      const x1 = Math.min(box.left + box.width, u.valToPos(to, "x", true));
      if (x1 <= x0) continue;
      ctx.fillStyle = LINK_COLORS[spans[i].v] || "#6e7681";
      ctx.fillRect(x0, box.top + box.height - h, x1 - x0, h);
    }
    ctx.restore();
  }

  function makeChart(name, container, series, axes, data, hooks, height) {
    const opts = {
      width: width(container),
      height: height || 170,
      scales: { x: { time: true, range: xRange } },
      series: [{}].concat(series),
      axes: axes,
      cursor: { drag: { x: false, y: false } },
      legend: { live: true },
      hooks: { draw: hooks || [] },
    };
    const u = new uPlot(opts, data, container);
    charts.set(name, u);
    return u;
  }

  function upsert(name, container, build, data) {
    const u = charts.get(name);
    if (u && u.root.parentNode === container) {
      u.setData(data);
      return u;
    }
    if (u) { u.destroy(); charts.delete(name); }
    container.replaceChildren();
    return build(data);
  }

  function dropCharts(keep) {
    for (const [name, u] of charts) {
      if (!keep.has(name)) { u.destroy(); charts.delete(name); }
    }
  }

  // -- device ----------------------------------------------------------------------------------

  function episodes(alerts) {
    const out = [];
    let open = alerts.active_at_start ? alerts.since : null;
    for (const a of alerts.alerts) {
      if (a.kind === "raise" && open === null) open = a.t;
      else if (a.kind === "clear" && open !== null) { out.push({ from: open, to: a.t }); open = null; }
    }
    if (open !== null) out.push({ from: open, to: Math.min(alerts.until, alerts.now) });
    return out;
  }

  function renderHead(d) {
    const cond = condition(d, d.now);
    $("device-head").replaceChildren(
      el("div", { class: "title" }, el("span", { text: d.id }), el("span", { class: "badge " + cond, text: cond })),
      el("div", { class: "facts" },
        el("span", {}, "last seen ", el("b", { text: ago(d.last_seen, d.now) })),
        el("span", {}, "queue ", el("b", { text: d.queue_depth === null ? "–" : fmt(d.queue_depth, 6) })),
        el("span", {}, "link ", linkChip(d.link), " ", linkText(d.link)),
        el("span", {}, "agent ", el("b", { text: d.agent_version || "–" }))),
      el("div", { class: "more" }, "models ", modelsText(d.models), "  ·  sensors ", healthList(d.sensors)));
  }

  function renderTelemetry(series) {
    const root = $("telemetry");
    const names = new Set();
    const bySensor = new Map();
    for (const s of series.series) {
      if (!bySensor.has(s.sensor)) bySensor.set(s.sensor, []);
      bySensor.get(s.sensor).push(s);
    }
    // one block per sensor, one chart per channel; blocks are kept across polls
    const blocks = new Map([...root.children].map((b) => [b.dataset.sensor, b]));
    for (const block of blocks.values()) if (!bySensor.has(block.dataset.sensor)) block.remove();
    let ci = 0;
    for (const [sensor, list] of bySensor) {
      let block = blocks.get(sensor);
      if (!block) {
        block = el("div", { class: "sensor", "data-sensor": sensor }, el("h3", { text: sensor }), el("div", { class: "grid" }));
        root.append(block);
      }
      const grid = block.querySelector(".grid");
      for (const s of list) {
        const name = "telemetry:" + s.sensor + "/" + s.channel;
        names.add(name);
        const color = PALETTE[ci++ % PALETTE.length];
        let panel = [...grid.children].find((p) => p.dataset.chart === name);
        if (!panel) {
          panel = el("div", { class: "panel", "data-chart": name }, el("h4", {}, s.channel, el("span")), el("div", { class: "chart" }));
          grid.append(panel);
        }
        panel.querySelector("h4 span").textContent =
          s.points + " readings" + (s.t.length < s.points ? ", " + s.t.length + " shown (min/max per interval)" : "");
        const box = panel.querySelector(".chart");
        upsert(name, box, (data) => makeChart(name, box,
          [{ label: s.channel, stroke: color, width: 1.5, fill: color + "14", points: { show: false } }],
          [AXIS, Object.assign({ size: 56 }, AXIS)], data, [drawAlerts]), [s.t, s.v]);
      }
    }
    for (const block of root.children) {
      for (const panel of [...block.querySelectorAll(".panel")]) if (!names.has(panel.dataset.chart)) panel.remove();
    }
    const notes = [];
    if (series.sampled > 1) notes.push("a 1-in-" + series.sampled + " sample of " + series.records + " records");
    if (series.dropped_channels) notes.push(series.dropped_channels + " channels not shown");
    if (!series.series.length) notes.push("no telemetry in this window");
    $("series-note").textContent = notes.join(" · ");
    return names;
  }

  function renderScore(alerts) {
    const thr = alerts.threshold;
    const times = new Map();
    const xs = [];
    const add = (t) => { if (!times.has(t)) { times.set(t, xs.length); xs.push(t); } };
    add(alerts.since);
    for (const a of alerts.alerts) add(a.t);
    add(alerts.until);
    xs.sort((a, b) => a - b);
    xs.forEach((t, i) => times.set(t, i));
    const raise = xs.map(() => null), clear = xs.map(() => null);
    for (const a of alerts.alerts) (a.kind === "clear" ? clear : raise)[times.get(a.t)] = a.score;
    const line = xs.map(() => (thr ? thr.value : null));
    const box = $("chart-score");
    const points = (color) => ({ show: true, size: 9, width: 1, stroke: color, fill: color });
    upsert("score", box, (data) => makeChart("score", box, [
      { label: "threshold", stroke: AMBER, width: 1.5, dash: [6, 4], points: { show: false } },
      { label: "raised", stroke: RED, paths: () => null, points: points(RED) },
      { label: "cleared", stroke: GREEN, paths: () => null, points: points(GREEN) },
    ], [AXIS, Object.assign({ size: 48 }, AXIS)], data, [drawAlerts], 200), [xs, line, raise, clear]);
    const src = thr ? "threshold " + fmt(thr.value) + " from " +
      (thr.source === "alert" ? "the newest alert" : thr.source + " detect/" + thr.model + "/threshold") : "no threshold known";
    $("score-note").textContent = "The agent sends no continuous score: the points are the scores its alerts carried. " + src + ".";
  }

  function renderLink(link) {
    const h = link.history;
    const xs = [];
    const seen = new Set();
    for (const key of ["rtt_ms", "loss", "state"]) for (const t of h[key].t) if (!seen.has(t)) { seen.add(t); xs.push(t); }
    const end = Math.min(link.until, link.now);
    if (xs.length && !seen.has(end)) xs.push(end);
    xs.sort((a, b) => a - b);
    const column = (key, scale) => {
      const at = new Map(h[key].t.map((t, i) => [t, h[key].v[i]]));
      let last = null;
      return xs.map((t) => {
        if (at.has(t)) last = at.get(t);
        return last === null ? null : last * scale;
      });
    };
    state.linkStates = h.state.t.map((t, i) => ({ t: t, v: h.state.v[i] }));
    const box = $("chart-link");
    upsert("link", box, (data) => makeChart("link", box, [
      { label: "RTT ms", stroke: "#4ea1ff", width: 1.5, scale: "ms", paths: uPlot.paths.stepped({ align: 1 }), points: { show: false } },
      { label: "loss %", stroke: "#f778ba", width: 1.5, scale: "%", paths: uPlot.paths.stepped({ align: 1 }), points: { show: false } },
    ], [AXIS, Object.assign({ scale: "ms", size: 48 }, AXIS), Object.assign({ scale: "%", side: 1, size: 40 }, AXIS, { grid: { show: false } })],
    data, [drawLinkStates], 200), [xs, column("rtt_ms", 1), column("loss", 100)]);
    const c = link.current;
    $("link-note").textContent = xs.length ? "As reported by the device (kept by the endpoint since it took the value)." :
      "No link history in this window" + (c && c.state ? "; now " + c.state + (linkText(c) ? ", " + linkText(c) : "") : "") + ".";
  }

  function renderAlertTable(alerts) {
    const body = $("alerts").querySelector("tbody");
    body.replaceChildren();
    for (const a of alerts.alerts.slice().reverse()) {
      body.append(el("tr", { class: a.kind, "data-seq": String(a.seq) },
        el("td", { text: clock(a.t) }), el("td", { text: a.kind }), el("td", { text: fmt(a.score) }),
        el("td", { text: fmt(a.threshold) }), el("td", { text: a.verdict || "–" }), el("td", { text: a.fault || "–" }),
        el("td", { text: a.confidence === null ? "–" : fmt(a.confidence, 2) }), el("td", { text: a.model || "–" }),
        el("td", { text: a.channels.map((c) => c[0] + " " + fmt(c[1])).join(", ") || "–" })));
    }
    $("alerts-empty").hidden = alerts.alerts.length > 0;
    $("alerts").hidden = alerts.alerts.length === 0;
  }

  async function pollDevice() {
    const shown = current();
    const id = encodeURIComponent(state.device);
    const base = "/api/devices/" + id;
    const [head, series] = await Promise.all([api(base), api(base + "/series?window=" + state.window)]);
    if (!shown()) return; // the page went to another device or window meanwhile: not drawn
    const q = "?window=" + state.window + "&until=" + encodeURIComponent(series.until); // -1e+21
    const [alerts, link] = await Promise.all([api(base + "/alerts" + q), api(base + "/link" + q)]);
    if (!shown()) return;
    state.since = series.since;
    state.until = series.until;
    state.now = series.now;
    state.episodes = episodes(alerts);
    state.marks = alerts.alerts.map((a) => ({ t: a.t, kind: a.kind }));
    renderHead(head);
    const anchor = $("anchor");
    anchor.className = "anchor" + (series.anchor === "latest" ? " stale" : "");
    anchor.textContent = series.anchor === "latest"
      ? "no data in the last " + label(state.window) + ": showing the window up to the newest reading, " + clock(series.until)
      : clock(series.since) + " – " + clock(series.until);
    const keep = renderTelemetry(series);
    renderScore(alerts);
    renderLink(link);
    renderAlertTable(alerts);
    keep.add("score");
    keep.add("link");
    dropCharts(keep);
    for (const u of charts.values()) u.redraw(false, false);
  }

  function label(seconds) {
    const w = WINDOWS.find((x) => x[0] === seconds);
    return w ? w[1] : seconds + " s";
  }

  // -- routing and polling ---------------------------------------------------------------------

  function route() {
    const hash = location.hash.replace(/^#/, "") || "/";
    const m = hash.match(/^\/device\/([^?]+)(?:\?window=(\d+))?$/);
    let device = null;
    try { device = m ? decodeURIComponent(m[1]) : null; } catch (err) { device = null; }
    clearTimeout(state.timer);
    if (device !== null) {
      if (device !== state.device) { dropCharts(new Set()); $("telemetry").replaceChildren(); }
      state.view = "device";
      state.device = device;
      state.window = m[2] ? Math.min(2592000, Math.max(10, Number(m[2]))) : state.window;
      $("crumbs").replaceChildren(el("a", { href: "#/", text: "fleet" }), " / ", device);
      renderWindows();
    } else {
      dropCharts(new Set());
      state.view = "fleet";
      state.device = null;
      $("crumbs").replaceChildren("fleet");
    }
    $("fleet-view").hidden = state.view !== "fleet";
    $("device-view").hidden = state.view !== "device";
    document.title = state.view === "device" ? state.device + " · edge-agent" : "edge-agent fleet";
    poll();
  }

  function renderWindows() {
    const group = $("windows");
    group.replaceChildren();
    for (const [seconds, text] of WINDOWS) {
      const b = el("button", { type: "button", class: seconds === state.window ? "on" : "", text: text });
      b.addEventListener("click", () => {
        location.hash = "#/device/" + encodeURIComponent(state.device) + "?window=" + seconds;
      });
      group.append(b);
    }
  }

  function current() {
    // whether the page still shows what it showed when this was called
    const view = state.view, device = state.device, win = state.window;
    return () => view === state.view && device === state.device && win === state.window;
  }

  async function poll() {
    clearTimeout(state.timer);
    const shown = current();
    try {
      if (state.view === "fleet") await pollFleet();
      else await pollDevice();
      if (shown()) {
        state.polls++;
        setStatus(true, "live · updated " + new Date().toLocaleTimeString());
      }
    } catch (err) {
      if (shown()) setStatus(false, String(err.message || err));
    }
    if (shown()) state.timer = setTimeout(poll, POLL_MS);
  }

  window.addEventListener("hashchange", route);
  window.addEventListener("resize", () => {
    for (const u of charts.values()) {
      const box = u.root.parentNode;
      if (box) u.setSize({ width: width(box), height: u.height });
    }
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
  route();
})();
