// fleetserve live dashboard: polls /api/dashboard every few seconds and draws it with uPlot.
// window.fleetserveDashboard exposes the last data and the charts (headless tests read it); each chart's
// element carries data-points = the number of x values it holds.
(function () {
  "use strict";
  const params = new URLSearchParams(location.search);
  const refreshMs = Math.max(500, Number(params.get("refresh") || 3000));
  const state = { data: null, charts: {}, updates: 0, errors: 0 };
  window.fleetserveDashboard = state;

  const colors = { p50: "#4f7cd8", p95: "#e69b00", p99: "#d05050", mean: "#222" };
  const fmtTime = (t) => new Date(t * 1000).toLocaleTimeString();

  function latencySeries() {
    return [
      {},
      { label: "p50", stroke: colors.p50, width: 1.5, spanGaps: true },
      { label: "p95", stroke: colors.p95, width: 1.5, spanGaps: true },
      { label: "p99", stroke: colors.p99, width: 2, spanGaps: true },
      { label: "mean", stroke: colors.mean, width: 1.5, dash: [6, 4], spanGaps: true },
    ];
  }

  const specs = {
    ttft: { series: latencySeries, data: (d) => [d.t, d.ttft_ms.p50, d.ttft_ms.p95, d.ttft_ms.p99, d.ttft_ms.mean] },
    tpot: { series: latencySeries, data: (d) => [d.t, d.tpot_ms.p50, d.tpot_ms.p95, d.tpot_ms.p99, d.tpot_ms.mean] },
    throughput: {
      series: () => [{}, { label: "tokens/s", stroke: "#4f7cd8", width: 1.5 },
        { label: "requests/s", stroke: "#2b9348", width: 1.5, scale: "req" }],
      axes: [{}, { scale: "y" }, { scale: "req", side: 1, grid: { show: false } }],
      data: (d) => [d.t, d.output_tokens_per_s, d.requests_per_s],
    },
    errors: {
      series: () => [{}, { label: "error rate", stroke: "#d05050", width: 1.5, fill: "rgba(208,80,80,.12)",
        value: (u, v) => (v == null ? "-" : (100 * v).toFixed(2) + "%") }],
      data: (d) => [d.t, d.error_rate],
    },
    replicas: {
      series: () => [{}, { label: "up", stroke: "#2b9348", width: 2 },
        { label: "desired", stroke: "#7b2cbf", width: 1.5, dash: [6, 4], spanGaps: true }],
      data: (d) => [d.t, d.replicas.actual, d.replicas.desired],
    },
    kv: {
      dynamic: true,
      axes: [{}, { size: 64, values: (u, vals) => vals.map((v) => (100 * v).toFixed(v < 0.01 ? 2 : 0) + "%") }],
      series: (d) => [{}, ...Object.keys(d.kv_cache_usage).map((rid, i) => ({
        label: rid, stroke: `hsl(${(i * 67) % 360} 65% 45%)`, width: 1.5, spanGaps: true })) ],
      data: (d) => [d.t, ...Object.values(d.kv_cache_usage)],
    },
    cost: {
      series: () => [{}, { label: "USD / 1k tokens", stroke: "#7b2cbf", width: 1.5, spanGaps: true,
        value: (u, v) => (v == null ? "-" : "$" + v.toFixed(5)) }],
      axes: [{}, { size: 70, values: (u, vals) => vals.map((v) => "$" + v.toPrecision(2)) }],
      data: (d) => [d.t, d.cost_per_1k_tokens],
    },
  };

  function makeChart(id, spec, d) {
    const el = document.getElementById(id);
    el.innerHTML = "";
    const opts = {
      width: Math.max(480, el.clientWidth || 560),
      height: 200,
      series: spec.series(d),
      axes: spec.axes || [{}, {}],
      scales: { x: { time: true } },
      legend: { live: true },
    };
    if (id === "ttft") {
      opts.hooks = { ready: [(u) => u.over.addEventListener("click", () => openSlowAt(u.cursor.idx))] };
    }
    const chart = new uPlot(opts, spec.data(d), el);
    chart._seriesCount = opts.series.length;
    return chart;
  }

  function draw(d) {
    for (const [id, spec] of Object.entries(specs)) {
      const el = document.getElementById(id);
      const data = spec.data(d);
      let chart = state.charts[id];
      if (!chart || (spec.dynamic && chart._seriesCount !== data.length)) {
        if (chart) chart.destroy();
        chart = state.charts[id] = makeChart(id, spec, d);
      } else {
        chart.setData(data);
      }
      el.dataset.points = String(d.t.length);
    }
  }

  function openSlowAt(idx) {
    const d = state.data;
    if (!d || idx == null || !d.slow_ttft[idx]) return;
    openTrace(d.slow_ttft[idx].trace_id);
  }

  function text(tag, content, cls) {
    const el = document.createElement(tag);
    el.textContent = content;
    if (cls) el.className = cls;
    return el;
  }

  function renderAlerts(d) {
    const box = document.getElementById("alerts");
    box.innerHTML = "";
    const firing = d.alerts.firing;
    box.dataset.firing = String(firing.length);
    if (!firing.length) box.appendChild(text("p", "no SLO alert firing", "empty"));
    const table = document.createElement("table");
    for (const a of firing) {
      const tr = table.insertRow();
      const sev = a.severity.replace("ALERT_SEVERITY_", "").toLowerCase();
      tr.appendChild(text("td", sev, sev));
      tr.appendChild(text("td", a.alert_id));
      tr.appendChild(text("td", a.summary));
    }
    box.appendChild(table);
    if (d.alerts.recent.length) {
      box.appendChild(text("h2", "recent changes"));
      const recent = document.createElement("table");
      for (const a of d.alerts.recent.slice(0, 8)) {
        const tr = recent.insertRow();
        const when = a.state === "ALERT_STATE_FIRING" ? a.fired_unix : a.resolved_unix;
        tr.appendChild(text("td", fmtTime(when)));
        tr.appendChild(text("td", a.state.replace("ALERT_STATE_", "").toLowerCase()));
        tr.appendChild(text("td", a.alert_id));
      }
      box.appendChild(recent);
    }
  }

  function renderSlowest(d) {
    const box = document.getElementById("slowest");
    box.innerHTML = "";
    box.dataset.rows = String(d.slowest.length);
    if (!d.slowest.length) return box.appendChild(text("p", "no request in the window", "empty"));
    const table = document.createElement("table");
    for (const s of d.slowest) {
      const tr = table.insertRow();
      tr.appendChild(text("td", s.e2e_ms.toFixed(1) + " ms"));
      const link = text("a", s.trace_id);
      link.onclick = () => openTrace(s.trace_id);
      const td = document.createElement("td");
      td.appendChild(link);
      tr.appendChild(td);
      tr.appendChild(text("td", "request " + s.request_id));
    }
    box.appendChild(table);
  }

  async function openTrace(traceId) {
    const section = document.getElementById("trace-section");
    const box = document.getElementById("trace");
    document.getElementById("trace-id").textContent = traceId;
    section.hidden = false;
    const resp = await fetch("/api/trace/" + traceId);
    const t = await resp.json();
    box.innerHTML = "";
    box.dataset.spans = String((t.spans || []).length);
    if (!t.spans || !t.spans.length) return box.appendChild(text("p", "no spans kept for this trace", "empty"));
    const total = Math.max(...t.spans.map((s) => s.start_ms + s.duration_ms)) || 1;
    const table = document.createElement("table");
    for (const s of t.spans) {
      const tr = table.insertRow();
      tr.appendChild(text("td", s.service.replace("fleetserve-", "")));
      tr.appendChild(text("td", s.name));
      const td = document.createElement("td");
      td.style.width = "55%";
      const bar = document.createElement("div");
      bar.className = "bar" + (s.error ? " err" : "");
      const fill = document.createElement("span");
      fill.style.left = (100 * s.start_ms / total) + "%";
      fill.style.width = Math.max(0.5, 100 * s.duration_ms / total) + "%";
      bar.appendChild(fill);
      bar.appendChild(text("em", s.duration_ms.toFixed(2) + " ms"));
      td.appendChild(bar);
      tr.appendChild(td);
    }
    box.appendChild(table);
    section.scrollIntoView({ block: "nearest" });
  }

  function updateModels(models) {
    const sel = document.getElementById("model");
    const have = new Set([...sel.options].map((o) => o.value));
    for (const m of models) if (!have.has(m)) sel.add(new Option(m, m));
  }

  async function refresh() {
    const model = document.getElementById("model").value;
    const windowS = document.getElementById("window").value;
    try {
      const resp = await fetch(`/api/dashboard?window=${windowS}&model=${encodeURIComponent(model)}`);
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const d = await resp.json();
      state.data = d;
      updateModels(d.models);
      draw(d);
      renderAlerts(d);
      renderSlowest(d);
      state.updates += 1;
      document.body.dataset.updates = String(state.updates);
      const reqs = d.requests_per_s.length ? d.requests_per_s[d.requests_per_s.length - 1].toFixed(1) : "0";
      document.getElementById("status").textContent =
        `updated ${fmtTime(d.now)} · ${d.t.length} points · ${reqs} req/s now · every ${refreshMs / 1000}s`;
    } catch (e) {
      state.errors += 1;
      document.getElementById("status").textContent = "error: " + e.message;
    }
  }

  for (const id of ["model", "window"]) document.getElementById(id).addEventListener("change", () => {
    for (const c of Object.values(state.charts)) c.destroy();
    state.charts = {};
    refresh();
  });
  // ?trace=<id> opens a trace at once (links from elsewhere, headless checks of the waterfall).
  refresh().then(() => params.get("trace") && openTrace(params.get("trace")));
  setInterval(refresh, refreshMs);
})();
