// netboot web UI: forms that post JSON to the API, live boot events over SSE, table
// search and sort, times in the browser's time zone, the device traffic panel, the
// dashboard's throughput per service and the installer upload. Hand-written; no build step, no dependencies.
"use strict";

(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

  // Times: the page carries RFC 3339 in UTC; show them in the browser's time zone.
  const timeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
  function localTime(el) {
    const d = new Date(el.getAttribute("datetime"));
    if (!isNaN(d)) {
      el.textContent = timeFormat.format(d);
      el.title = el.getAttribute("datetime");
    }
  }

  function binary(bytes) {
    const units = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if (bytes < 1024) return `${bytes} B`;
    let v = bytes / 1024, u = 0;
    while (v >= 1024 && u + 1 < units.length) { v /= 1024; u++; }
    return `${v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)} ${units[u]}`;
  }

  function text(tag, value, cls) {
    const el = document.createElement(tag);
    el.textContent = value == null ? "" : String(value);
    if (cls) el.className = cls;
    return el;
  }

  // API calls: JSON in and out; errors carry the API's message.
  async function api(method, url, body) {
    const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const res = await fetch(url, init);
    const raw = await res.text();
    let data = null;
    try { data = raw ? JSON.parse(raw) : null; } catch (_) { data = null; }
    if (!res.ok) {
      const msg = data && data.error && (data.error.message || data.error) || data && data.message || `${res.status} ${res.statusText}`;
      throw new Error(typeof msg === "string" ? msg : JSON.stringify(msg));
    }
    return data;
  }

  function fill(template, values) {
    // MACs keep their colons: they are valid in a path and readable in the address bar.
    return template.replace(/\{(\w+)\}/g, (_, k) => encodeURIComponent(values[k] ?? "").replace(/%3A/gi, ":"));
  }

  function then(how, result, form) {
    if (!how || how === "reload") { location.reload(); return; }
    if (how === "next") {
      const next = new URLSearchParams(location.search).get("next");
      location.assign(next && next.startsWith("/ui/") ? next : "/ui/");
      return;
    }
    if (how === "operation") { followOperation(result, form); return; }
    if (how === "done") {
      form.reset();
      $(".form-ok", form).textContent = form.dataset.done || "Done.";
      return;
    }
    if (how === "show-secret") {
      const out = $(".form-ok", form);
      out.textContent = `Token created. Copy the secret now, it is not shown again: ${result.secret}`;
      return;
    }
    location.assign(fill(how, result || {}));
  }

  // A background operation (an image copy): a progress bar from GET /api/v1/operations/{id}
  // until it is done (then the page reloads) or failed (its error shows).
  async function followOperation(op, form) {
    const bar = $("progress", form), label = $("[data-progress-text]", form);
    const ok = $(".form-ok", form), err = $(".form-error", form), button = $("button[type=submit]", form);
    bar.parentElement.hidden = false;
    if (ok) ok.textContent = op.note || "";
    button.disabled = true;
    for (;;) {
      const pct = op.bytes_total ? Math.floor(100 * op.bytes_done / op.bytes_total) : 100;
      bar.value = pct;
      label.textContent = `${pct} % of ${binary(op.bytes_total)}${op.method ? ` (${op.method})` : ""}`;
      if (op.state === "done") { setTimeout(() => location.reload(), 800); return; }
      if (op.state === "failed") { err.textContent = `Copy failed: ${op.error}`; button.disabled = false; return; }
      await new Promise((r) => setTimeout(r, 500));
      try { op = await api("GET", `/api/v1/operations/${op.id}`); }
      catch (e) { err.textContent = e.message; button.disabled = false; return; }
    }
  }

  // Collects a form's fields into a JSON body, by each field's data-type.
  function collect(form) {
    const body = {}, path = {};
    for (const el of form.elements) {
      if (!el.name || el.type === "submit" || el.type === "button" || el.type === "file") continue;
      const kind = el.dataset.type || "";
      const v = el.value;
      if (kind === "confirm") {
        if (v !== form.elements[el.dataset.confirms].value) throw new Error("The passwords differ.");
        continue;
      }
      if (kind === "path") { path[el.name] = v; continue; }
      if (kind === "prefixed") { body[el.name] = (form.dataset.prefix || "") + v.trim(); continue; }
      if (kind === "bool") { body[el.name] = el.checked; continue; }
      if (kind === "int") { body[el.name] = parseInt(v, 10); continue; }
      if (kind === "int-omit") { if (v !== "") body[el.name] = parseInt(v, 10); continue; }
      if (kind === "gib") { body[el.name] = parseInt(v, 10) * 1024 * 1024 * 1024; continue; }
      if (kind === "list") { body[el.name] = v.split(",").map((s) => s.trim()).filter(Boolean); continue; }
      if (kind === "null-empty") { body[el.name] = v === "" ? null : v; continue; }
      if (kind === "omit-empty" && v === "") continue;
      body[el.name] = v;
    }
    if (form.dataset.extra) Object.assign(body, JSON.parse(form.dataset.extra));
    return { body, path };
  }

  function showError(scope, err) {
    const out = scope && $(".form-error", scope);
    if (out) { out.textContent = err.message; out.scrollIntoView({ block: "nearest" }); }
    else alert(err.message);
  }

  document.addEventListener("submit", async (ev) => {
    const form = ev.target;
    if (form.dataset.upload !== undefined) { ev.preventDefault(); upload(form); return; }
    if (!form.dataset.api) return;
    ev.preventDefault();
    const button = $("button[type=submit]", form);
    const err = $(".form-error", form);
    if (err) err.textContent = "";
    try {
      const { body, path } = collect(form);
      if (form.dataset.confirm && !confirm(form.dataset.confirm)) return;
      if (button) button.disabled = true;
      const result = await api(form.dataset.method || "POST", fill(form.dataset.api, path), body);
      then(form.dataset.then, result, form);
    } catch (e) {
      showError(form, e);
    } finally {
      if (button) button.disabled = false;
    }
  });

  document.addEventListener("click", async (ev) => {
    const button = ev.target.closest("button");
    if (!button) return;
    if (button.dataset.logout !== undefined) {
      try { await api("POST", "/api/v1/auth/logout"); } catch (_) { /* the session may be gone already */ }
      location.assign("/ui/login");
      return;
    }
    if (button.dataset.open) {
      const row = document.getElementById(button.dataset.open);
      row.hidden = !row.hidden;
      button.setAttribute("aria-expanded", String(!row.hidden));
      const first = $("input, select", row);
      if (!row.hidden && first) first.focus();
      return;
    }
    if (button.dataset.sort !== undefined) { sortTable(button); return; }
    if (!button.dataset.api || button.type === "submit") return;
    ev.preventDefault();
    if (button.dataset.confirm && !confirm(button.dataset.confirm)) return;
    button.disabled = true;
    try {
      const body = button.dataset.body ? JSON.parse(button.dataset.body) : undefined;
      const result = await api(button.dataset.method || "POST", button.dataset.api, body);
      then(button.dataset.then, result, button.closest("form"));
    } catch (e) {
      showError(button.closest("form, td, section"), e);
    } finally {
      button.disabled = false;
    }
  });

  // Tables: search filters rows, header buttons sort by column.
  function filterTable(input) {
    const table = document.getElementById(input.dataset.filter);
    if (!table) return;
    const q = input.value.trim().toLowerCase();
    let shown = 0;
    for (const row of table.tBodies[0].rows) {
      const hit = !q || row.textContent.toLowerCase().includes(q);
      row.hidden = !hit;
      if (hit) shown++;
    }
    const count = $(`[data-count="${input.dataset.filter}"]`);
    if (count) count.textContent = `${shown} of ${table.tBodies[0].rows.length} shown`;
  }

  function sortTable(button) {
    const th = button.closest("th");
    const table = th.closest("table");
    const col = parseInt(button.dataset.sort, 10);
    const asc = th.getAttribute("aria-sort") !== "ascending";
    $$("th", table).forEach((h) => h.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    const key = (row) => {
      const cell = row.cells[col];
      return cell ? (cell.dataset.key ?? cell.textContent.trim()) : "";
    };
    const rows = Array.from(table.tBodies[0].rows);
    const num = rows.every((r) => key(r) === "" || !isNaN(Number(key(r))));
    rows.sort((a, b) => {
      const x = key(a), y = key(b);
      const c = num ? Number(x) - Number(y) : x.localeCompare(y, undefined, { numeric: true });
      return asc ? c : -c;
    });
    rows.forEach((r) => table.tBodies[0].appendChild(r));
  }

  // Live boot events over Server-Sent Events.
  function eventRow(e, showMac) {
    const tr = document.createElement("tr");
    tr.className = "fresh";
    const td = document.createElement("td");
    const t = text("time", e.at);
    t.setAttribute("datetime", e.at);
    localTime(t);
    td.appendChild(t);
    tr.appendChild(td);
    if (showMac) {
      const m = document.createElement("td");
      m.className = "mono";
      const a = text("a", e.mac);
      a.href = `/ui/devices/${encodeURIComponent(e.mac)}`;
      m.appendChild(a);
      tr.appendChild(m);
    }
    const s = document.createElement("td");
    s.appendChild(text("span", e.source, `pill src-${e.source}`));
    tr.appendChild(s);
    tr.appendChild(text("td", e.kind, "mono"));
    tr.appendChild(text("td", e.detail, "detail"));
    tr.appendChild(text("td", e.ip || "", "mono"));
    return tr;
  }

  function liveEvents(tbody) {
    const status = $("[data-live-status]", tbody.closest("section"));
    const max = parseInt(tbody.dataset.max || "50", 10);
    const source = new EventSource(tbody.dataset.events);
    source.onopen = () => {
      tbody.dataset.connected = "1";
      if (status) { status.textContent = "live"; status.classList.add("on"); }
    };
    source.onerror = () => {
      if (status) { status.textContent = "reconnecting…"; status.classList.remove("on"); }
    };
    source.addEventListener("boot", (msg) => {
      const e = JSON.parse(msg.data);
      tbody.prepend(eventRow(e, tbody.dataset.showMac === "1"));
      while (tbody.rows.length > max) tbody.deleteRow(-1);
      const empty = $("[data-empty]", tbody.closest("section"));
      if (empty) empty.remove();
    });
  }

  // A sparkline of two rate series, with its legend: the current rates.
  function rateSpark(label, rx, tx) {
    const p = text("p", "", "rate-line");
    const svg = sparkSvg(label, rx, tx);
    const last = (h) => Math.round(h.length ? h[h.length - 1] : 0);
    p.append(
      svg,
      text("span", "from it ", "muted small"), sizeSpan("", last(rx), "/s", "bytes/s"), text("span", " ", ""),
      text("span", "to it ", "muted small"), sizeSpan("", last(tx), "/s", "bytes/s"),
      text("span", " · last 5 minutes", "muted small"),
    );
    return p;
  }

  // The device's traffic: figures from the API, each with its source; never invented.
  // While something counts, the panel is read again at the sampling interval (5 s).
  async function metrics(box) {
    let m;
    try {
      m = await api("GET", `/api/v1/devices/${encodeURIComponent(box.dataset.metrics)}/metrics`);
    } catch (e) {
      box.replaceChildren(text("p", `The figures could not be read: ${e.message}`, "warning"));
      return;
    }
    if (m.source !== "none") setTimeout(() => metrics(box), 5000);
    box.dataset.updated = String(Date.now());
    const parts = [];
    const src = text("p", "", "muted small");
    src.append("Source of the figures: ", text("strong", m.source), " · rx: from the device, tx: to the device");
    parts.push(src);
    for (const w of m.warnings || []) parts.push(text("p", w, "warning"));
    // Totals of all time, kept in the store: they outlive the counters.
    const lifetime = m.lifetime || [];
    if (lifetime.length > 0) {
      const p = text("p", "All time: ", "muted small");
      p.id = "lifetime";
      lifetime.forEach((t, i) => {
        const s = text("span", `${t.service} ${t.direction} ${binary(t.bytes)}`);
        s.title = `${t.bytes} bytes, ${t.packets} packets (${t.source})`;
        p.append(i ? " · " : "", s);
      });
      parts.push(p);
    }
    const totals = m.totals || [];
    if (m.source === "none" || totals.length === 0) {
      if (m.source !== "none") parts.push(text("p", "No traffic counted for this device yet.", "empty"));
      box.replaceChildren(...parts);
      return;
    }
    parts.push(rateSpark("Bytes per second from and to the device, last 5 minutes", m.rx_history || [], m.tx_history || []));
    const services = [...new Set(totals.map((t) => t.service))];
    const max = Math.max(1, ...totals.map((t) => t.bytes));
    // One SVG unit per CSS pixel, so the labels keep the page's text size.
    const rowH = 24, labelW = 80, valueW = 250, w = Math.max(400, box.clientWidth);
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${w} ${services.length * rowH * 2 + 8}`);
    svg.setAttribute("width", w);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "Bytes per service and direction");
    let y = 4;
    for (const svc of services) {
      for (const dir of ["rx", "tx"]) {
        const t = totals.find((x) => x.service === svc && x.direction === dir) || { bytes: 0, bytes_per_second: 0, source: m.source };
        const label = document.createElementNS(ns, "text");
        label.setAttribute("x", 0); label.setAttribute("y", y + 16);
        label.textContent = `${svc} ${dir}`;
        const bar = document.createElementNS(ns, "rect");
        const bw = t.bytes === 0 ? 0 : Math.max(1, (w - labelW - valueW) * t.bytes / max);
        bar.setAttribute("x", labelW); bar.setAttribute("y", y + 3);
        bar.setAttribute("width", bw); bar.setAttribute("height", rowH - 6);
        bar.setAttribute("class", dir);
        const title = document.createElementNS(ns, "title");
        title.textContent = `${t.bytes} bytes (${t.source})`;
        bar.appendChild(title);
        const val = document.createElementNS(ns, "text");
        val.setAttribute("x", labelW + bw + 6); val.setAttribute("y", y + 16);
        val.textContent = `${binary(t.bytes)} · ${binary(Math.round(t.bytes_per_second))}/s · ${t.source}`;
        svg.append(label, bar, val);
        y += rowH;
      }
    }
    const fig = document.createElement("div");
    fig.className = "metric-bars";
    fig.appendChild(svg);
    parts.push(fig);
    // Install progress on its iSCSI disk (stall detection runs in the daemon).
    const inst = m.install;
    if (inst) {
      const when = (secs) => new Date(secs * 1000).toLocaleString();
      const p = text("p", "", inst.phase === "stalled" ? "warning" : "muted small");
      p.id = "install-state";
      const written = text("span", `${binary(inst.written_bytes)} written`);
      written.title = `${inst.written_bytes} bytes`;
      const read = text("span", `${binary(inst.read_bytes)} read`);
      read.title = `${inst.read_bytes} bytes`;
      p.append(
        "Install on its iSCSI disk: ", text("strong", inst.phase), ` since ${when(inst.since)} · `,
        written, ", ", read, ` · last progress ${when(inst.last_progress)}`,
      );
      parts.push(p);
    }
    const sessions = m.sessions || [];
    if (sessions.length === 0) {
      parts.push(text("p", "No connections in the last 30 s.", "muted small"));
    } else {
      const table = document.createElement("table");
      table.className = "sessions";
      const head = document.createElement("tr");
      for (const h of ["Connection", "Device", "netbootd", "From device", "To device"]) {
        const th = text("th", h);
        th.scope = "col";
        head.appendChild(th);
      }
      table.createTHead().appendChild(head);
      const body = table.createTBody();
      for (const c of sessions) {
        const tr = body.insertRow();
        tr.append(
          text("td", `${c.service} (${c.protocol})`),
          text("td", c.client, "mono"),
          text("td", c.server, "mono"),
          text("td", binary(c.rx_bytes)),
          text("td", binary(c.tx_bytes)),
        );
        tr.cells[3].title = `${c.rx_bytes} bytes (${c.source})`;
        tr.cells[4].title = `${c.tx_bytes} bytes (${c.source})`;
      }
      parts.push(text("h3", "Connections in the last 30 s"), table);
    }
    box.replaceChildren(...parts);
  }

  // Installer upload: the file goes as the request body; XHR reports the progress.
  function upload(form) {
    const file = $("input[type=file]", form).files[0];
    const err = $(".form-error", form), ok = $(".form-ok", form);
    err.textContent = ""; ok.textContent = "";
    if (!file) { err.textContent = "Choose a file first."; return; }
    const folder = (form.dataset.folder || "").replace(/^\/+|\/+$/g, "");
    const path = (folder ? `${folder}/` : "") + file.name;
    const q = new URLSearchParams({ kind: form.elements.kind.value });
    if (form.elements.name.value.trim()) q.set("name", form.elements.name.value.trim());
    const url = form.dataset.upload + path.split("/").map(encodeURIComponent).join("/") + "?" + q;
    const bar = $("progress", form), label = $("[data-progress-text]", form), button = $("button[type=submit]", form);
    bar.parentElement.hidden = false;
    bar.value = 0;
    button.disabled = true;
    const xhr = new XMLHttpRequest();
    window.uploadProgressEvents = 0;
    xhr.upload.onprogress = (e) => {
      if (!e.lengthComputable) return;
      window.uploadProgressEvents++;
      const pct = Math.floor(100 * e.loaded / e.total);
      bar.value = pct;
      label.textContent = `${pct} % of ${binary(e.total)}`;
    };
    xhr.onload = () => {
      button.disabled = false;
      if (xhr.status >= 200 && xhr.status < 300) {
        bar.value = 100;
        label.textContent = `100 % of ${binary(file.size)}`;
        ok.textContent = `Uploaded ${path}.`;
        setTimeout(() => location.reload(), 1500);
      } else {
        let msg = `${xhr.status} ${xhr.statusText}`;
        try { const d = JSON.parse(xhr.responseText); msg = d.error && (d.error.message || d.error) || msg; } catch (_) { /* not JSON */ }
        err.textContent = `Upload failed: ${msg}`;
      }
    };
    xhr.onerror = () => { button.disabled = false; err.textContent = "Upload failed: the connection broke."; };
    xhr.open("PUT", url);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.send(file);
  }

  // Sparklines: two series on one scale, newest at the right edge (as view.rs draws them).
  const SPARK_W = 160, SPARK_H = 32, SPARK_SLOTS = 60;
  function sparkPoints(a, b) {
    const peak = Math.max(0, ...a, ...b);
    const step = SPARK_W / (SPARK_SLOTS - 1);
    const line = (series) => series.map((v, i) => {
      const x = SPARK_W - (series.length - 1 - i) * step;
      const y = peak > 0 ? SPARK_H - 1 - (SPARK_H - 3) * v / peak : SPARK_H - 1;
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    }).join(" ");
    return [line(a), line(b)];
  }

  // The SVG of a sparkline of `rx` and `tx`, labelled for screen readers.
  function sparkSvg(label, rx, tx) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", `0 0 ${SPARK_W} ${SPARK_H}`);
    svg.setAttribute("width", SPARK_W);
    svg.setAttribute("height", SPARK_H);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", label);
    const [a, b] = sparkPoints(rx, tx);
    for (const [cls, points] of [["rx", a], ["tx", b]]) {
      const line = document.createElementNS(ns, "polyline");
      line.setAttribute("class", cls);
      line.setAttribute("points", points);
      svg.appendChild(line);
    }
    return svg;
  }

  function sizeSpan(cls, bytes, suffix, unit) {
    const el = text("span", `${binary(bytes)}${suffix}`, cls);
    el.title = `${bytes} ${unit}`;
    return el;
  }

  // The dashboard's throughput per service: the API's figures, polled at its sampling
  // interval and drawn into rows of fixed height, so that nothing moves when they change.
  function throughput(box) {
    const row = (f) => {
      const tr = document.createElement("tr");
      tr.dataset.service = f.service;
      const th = text("th", f.service);
      th.scope = "row";
      tr.appendChild(th);
      for (const dir of ["rx", "tx"]) {
        const td = document.createElement("td");
        const rate = Math.round(f[`${dir}_bytes_per_second`]);
        td.append(sizeSpan("rate", rate, "/s", "bytes/s"), sizeSpan("total", f[`${dir}_bytes`], " in all", "bytes"));
        tr.appendChild(td);
      }
      const td = document.createElement("td");
      td.appendChild(sparkSvg(`${f.service}: bytes per second in and out, last 5 minutes`, f.rx_history || [], f.tx_history || []));
      tr.appendChild(td);
      return tr;
    };
    const draw = (t) => {
      const off = $("[data-throughput-off]", box), table = $("table", box);
      $("[data-throughput-source]", box).textContent = t.source;
      box.dataset.source = t.source;
      const note = $("[data-throughput-note]", box), warnings = (t.warnings || []).join("; ");
      if (t.source === "none") {
        $("[data-throughput-reason]", box).textContent = warnings;
        off.hidden = false;
        note.hidden = true;
        table.hidden = true;
        return;
      }
      note.textContent = warnings ? `${warnings}.` : "";
      note.hidden = !warnings;
      off.hidden = true;
      table.hidden = false;
      table.tBodies[0].replaceChildren(...(t.services || []).map(row));
    };
    let every = 5000;
    const poll = async () => {
      try {
        const t = await api("GET", box.dataset.throughput);
        draw(t);
        if (t.sample_secs) every = t.sample_secs * 1000;
        box.dataset.updated = String(Date.now());
      } catch (e) {
        $("[data-throughput-source]", box).textContent = `unreadable (${e.message})`;
      }
      setTimeout(poll, every);
    };
    poll();
  }

  document.addEventListener("input", (ev) => {
    if (ev.target.dataset.filter) filterTable(ev.target);
  });

  function init() {
    $$("time[datetime]").forEach(localTime);
    $$("tbody[data-events]").forEach(liveEvents);
    $$("[data-metrics]").forEach(metrics);
    $$("[data-throughput]").forEach(throughput);
    document.body.dataset.ready = "1";
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
