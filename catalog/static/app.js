// drover catalog status page.
//
// Everything a master reports is untrusted: it is only ever put in the page
// as text (textContent, setAttribute on data-*), never parsed as HTML, and the
// server's Content-Security-Policy forbids inline script as a second line.
'use strict';

(function () {
  const POLL_MS = 2500;
  const POLL_HIDDEN_MS = 10000;
  const STALE_SECS = 60;

  const state = {
    masters: [],
    stats: null,
    serverSkew: 0, // server clock minus ours, seconds
    lastOk: 0,
    error: null,
    sortKey: localStorage.getItem('drover.sortKey') || 'last_update',
    sortDir: localStorage.getItem('drover.sortDir') || 'desc',
    filter: sessionStorage.getItem('drover.filter') || '',
    previous: new Map(), // key -> {col: value} to flash changed numbers
  };

  // ---- small DOM helpers (text only) ----

  function el(tag, opts, ...children) {
    const e = document.createElement(tag);
    if (opts) {
      if (opts.cls) e.className = opts.cls;
      if (opts.attrs) for (const [k, v] of Object.entries(opts.attrs)) e.setAttribute(k, String(v));
      if (opts.title != null) e.title = String(opts.title);
    }
    for (const c of children) {
      if (c == null || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function $(id) { return document.getElementById(id); }

  function num(v) {
    const n = Number(v);
    return Number.isFinite(n) && n >= 0 ? n : 0;
  }

  function fmtInt(n) { return num(n).toLocaleString('en-US'); }

  function fmtMem(mb) {
    mb = num(mb);
    if (mb >= 1024 * 1024) return (mb / 1024 / 1024).toFixed(1) + ' TB';
    if (mb >= 1024) return (mb / 1024).toFixed(mb >= 10240 ? 0 : 1) + ' GB';
    return mb + ' MB';
  }

  function fmtAge(secs) {
    secs = Math.max(0, Math.round(secs));
    if (secs < 60) return secs + 's ago';
    if (secs < 3600) return Math.floor(secs / 60) + 'm ago';
    if (secs < 86400) return Math.floor(secs / 3600) + 'h ago';
    return Math.floor(secs / 86400) + 'd ago';
  }

  function fmtDuration(secs) {
    secs = Math.max(0, Math.round(secs));
    const d = Math.floor(secs / 86400), h = Math.floor(secs % 86400 / 3600),
      m = Math.floor(secs % 3600 / 60), s = secs % 60;
    if (d) return d + 'd ' + h + 'h';
    if (h) return h + 'h ' + m + 'm';
    if (m) return s ? m + 'm ' + s + 's' : m + 'm';
    return s + 's';
  }

  function nowServer() { return Date.now() / 1000 + state.serverSkew; }

  function keyOf(m) {
    return [m.kind, m.host, m.port, m.project].map(String).join('|');
  }

  function address(m) {
    const host = String(m.host || '');
    return (host.includes(':') ? '[' + host + ']' : host) + ':' + num(m.port);
  }

  function totalTasks(m) {
    return num(m.tasks_done) + num(m.tasks_failed) + num(m.tasks_waiting) + num(m.tasks_running);
  }

  function progress(m) {
    const t = totalTasks(m);
    return t ? num(m.tasks_done) / t : 0;
  }

  function pct(x) { return (Math.round(x * 1000) / 10).toFixed(x > 0 && x < 0.1 ? 1 : 0) + '%'; }

  // A stacked bar: done, failed, running, then waiting as the empty track.
  function progressBar(m, big) {
    const t = totalTasks(m);
    const bar = el('div', { cls: 'bar' + (big ? ' bar-big' : ''), attrs: {
      role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100,
      'aria-valuenow': Math.round(progress(m) * 100),
    } });
    for (const [cls, v] of [['seg-done', m.tasks_done], ['seg-failed', m.tasks_failed], ['seg-running', m.tasks_running]]) {
      if (!t || !num(v)) continue;
      const s = el('span', { cls: 'seg ' + cls });
      s.style.width = (num(v) / t * 100) + '%';
      bar.append(s);
    }
    return bar;
  }

  function meter(label, used, total, fmt) {
    used = num(used); total = num(total);
    const frac = total ? Math.min(1, used / total) : 0;
    const fill = el('span', { cls: 'meter-fill' });
    fill.style.width = (frac * 100) + '%';
    return el('div', { cls: 'meter' },
      el('div', { cls: 'meter-head' },
        el('span', { cls: 'meter-label' }, label),
        el('span', { cls: 'meter-value' }, fmt(used) + ' / ' + fmt(total))),
      el('div', { cls: 'meter-track' }, fill));
  }

  // ---- data ----

  async function fetchJson(url) {
    const r = await fetch(url, { cache: 'no-store', headers: { Accept: 'application/json' } });
    if (!r.ok) throw new Error(url + ': HTTP ' + r.status);
    const date = Date.parse(r.headers.get('Date') || '');
    return { body: await r.json(), date };
  }

  async function poll() {
    try {
      const [q, s] = await Promise.all([fetchJson('/query.json'), fetchJson('/api/stats').catch(() => null)]);
      state.masters = Array.isArray(q.body) ? q.body.filter(m => m && typeof m === 'object') : [];
      if (s) state.stats = s.body;
      if (Number.isFinite(q.date)) {
        // Ages are computed against the server's clock so a skewed client
        // does not show every master as stale.
        state.serverSkew = (q.date - Date.now()) / 1000;
      }
      state.lastOk = Date.now();
      state.error = null;
    } catch (e) {
      state.error = String(e && e.message || e);
    }
    render();
    setTimeout(poll, document.hidden ? POLL_HIDDEN_MS : POLL_MS);
  }

  // ---- rendering ----

  function render() {
    renderLive();
    renderTotals();
    const route = parseRoute();
    $('list-view').hidden = route.view !== 'list';
    $('detail-view').hidden = route.view !== 'detail';
    if (route.view === 'detail') renderDetail(route.key); else renderList();
    renderFooter();
  }

  function renderLive() {
    const live = $('live');
    live.classList.toggle('is-error', !!state.error);
    live.classList.toggle('is-ok', !state.error && !!state.lastOk);
    if (state.error) {
      $('live-text').textContent = state.lastOk ? 'catalog unreachable, retrying' : 'cannot reach catalog, retrying';
      live.title = state.error;
    } else if (state.lastOk) {
      $('live-text').textContent = 'live · ' + new Date(state.lastOk).toLocaleTimeString();
      live.title = 'refreshes every ' + POLL_MS / 1000 + ' s';
    }
  }

  function setText(id, text) {
    const e = $(id);
    if (e.textContent !== text) {
      // The first value replaces a placeholder; only later changes are news.
      const first = e.textContent === '–';
      e.textContent = text;
      if (!first) flash(e);
    }
  }

  function flash(e) {
    e.classList.remove('changed');
    void e.offsetWidth; // restart the animation
    e.classList.add('changed');
  }

  function renderTotals() {
    const ms = state.masters.filter(m => !m.stopped);
    const sum = f => ms.reduce((a, m) => a + num(m[f]), 0);
    setText('t-masters', fmtInt(ms.length));
    setText('t-workers', fmtInt(sum('workers_busy')) + ' / ' + fmtInt(sum('workers_connected')));
    setText('t-running', fmtInt(sum('tasks_running')));
    setText('t-waiting', fmtInt(sum('tasks_waiting')));
    setText('t-done', fmtInt(sum('tasks_done')));
    setText('t-cores', fmtInt(sum('cores_inuse')) + ' / ' + fmtInt(sum('cores_total')));
  }

  function matcher() {
    const f = state.filter.trim();
    if (!f) return () => true;
    let re = null;
    try { re = new RegExp(f, 'i'); } catch (_) { /* plain text then */ }
    const lower = f.toLowerCase();
    return m => {
      const p = String(m.project || '');
      return re ? re.test(p) : p.toLowerCase().includes(lower);
    };
  }

  function sortValue(m, key) {
    switch (key) {
      case 'project': return String(m.project || '').toLowerCase();
      case 'address': return address(m).toLowerCase();
      case 'progress': return progress(m);
      default: return num(m[key]);
    }
  }

  function sorted(list) {
    const k = state.sortKey, dir = state.sortDir === 'asc' ? 1 : -1;
    return list.slice().sort((a, b) => {
      const va = sortValue(a, k), vb = sortValue(b, k);
      if (va < vb) return -dir;
      if (va > vb) return dir;
      return keyOf(a) < keyOf(b) ? -1 : 1;
    });
  }

  const COLUMNS = [
    { id: 'project', label: 'Project' },
    { id: 'address', label: 'Host : port' },
    { id: 'tasks_waiting', label: 'Waiting', num: true },
    { id: 'tasks_running', label: 'Running', num: true },
    { id: 'tasks_done', label: 'Done', num: true },
    { id: 'tasks_failed', label: 'Failed', num: true },
    { id: 'workers', label: 'Workers', num: true },
    { id: 'cores', label: 'Cores', num: true },
    { id: 'progress', label: 'Progress' },
    { id: 'updated', label: 'Updated', num: true },
  ];

  function renderList() {
    const match = matcher();
    const shown = sorted(state.masters.filter(match));
    const body = $('masters-body');
    const rows = [];
    const now = nowServer();
    const seen = new Map();
    for (const m of shown) {
      const key = keyOf(m);
      const age = now - num(m.last_update);
      const tr = el('tr', { cls: 'row' + (m.stopped ? ' is-stopped' : age > STALE_SECS ? ' is-stale' : ''), attrs: {
        'data-key': key, tabindex: 0, 'aria-label': 'Show details of ' + String(m.project),
      } });
      const prev = state.previous.get(key) || {};
      const values = {};
      for (const col of COLUMNS) {
        const td = el('td', { cls: (col.num ? 'num ' : '') + 'col-' + col.id, attrs: { 'data-label': col.label, 'data-col': col.id } });
        let text;
        switch (col.id) {
          case 'project': {
            text = String(m.project);
            const name = el('span', { cls: 'project-name' }, text);
            td.append(name);
            if (m.stopped) td.append(el('span', { cls: 'badge badge-stopped' }, 'stopped'));
            else if (age > STALE_SECS) td.append(el('span', { cls: 'badge badge-stale' }, 'stale'));
            if (m.owner) td.append(el('span', { cls: 'owner' }, String(m.owner)));
            break;
          }
          case 'address': text = address(m); td.append(el('span', { cls: 'mono' }, text)); break;
          case 'workers': text = fmtInt(m.workers_busy) + ' / ' + fmtInt(m.workers_connected); td.append(text); break;
          case 'cores': text = fmtInt(m.cores_inuse) + ' / ' + fmtInt(m.cores_total); td.append(text); break;
          case 'progress': {
            text = pct(progress(m));
            td.append(el('div', { cls: 'progress-cell' }, progressBar(m, false), el('span', { cls: 'pct' }, text)));
            break;
          }
          case 'updated': text = fmtAge(age); td.append(el('time', { title: new Date(num(m.last_update) * 1000).toLocaleString() }, text)); break;
          default: text = fmtInt(m[col.id]); td.append(text);
        }
        values[col.id] = text;
        if (col.num && col.id !== 'updated' && prev[col.id] !== undefined && prev[col.id] !== text) {
          td.classList.add('changed');
        }
        tr.append(td);
      }
      seen.set(key, values);
      rows.push(tr);
    }
    state.previous = seen;
    body.replaceChildren(...rows);
    $('empty').hidden = shown.length > 0;
    $('empty').textContent = state.masters.length
      ? 'No master matches this filter.'
      : 'No master is reporting to this catalog yet. Point one at it: drover run --catalog '
        + location.host + ' --project NAME tasks.txt';
    $('shown').textContent = shown.length === state.masters.length
      ? fmtInt(shown.length) + (shown.length === 1 ? ' master' : ' masters')
      : fmtInt(shown.length) + ' of ' + fmtInt(state.masters.length) + ' masters';
    for (const th of document.querySelectorAll('#masters th[data-sort]')) {
      const k = th.getAttribute('data-sort');
      th.setAttribute('aria-sort', k === state.sortKey ? (state.sortDir === 'asc' ? 'ascending' : 'descending') : 'none');
    }
  }

  function kv(label, value, mono) {
    return el('div', { cls: 'kv' }, el('dt', null, label), el('dd', { cls: mono ? 'mono' : '' }, value));
  }

  function statTile(label, value, cls) {
    return el('div', { cls: 'tile ' + (cls || '') }, el('div', { cls: 'tile-value' }, value), el('div', { cls: 'tile-label' }, label));
  }

  // ---- history charts (inline SVG, drawn from the report's columns) ----

  const SVG_NS = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }

  function column(h, name) {
    const c = h && Array.isArray(h[name]) ? h[name].map(num) : [];
    return c;
  }

  // One small chart: each series a line (the first also filled), over the
  // history's time span, with its latest value and the peak in the legend.
  function chart(id, title, h, series, yMax) {
    const W = 320, H = 90, n = Math.max(0, ...series.map(s => s.values.length));
    const peak = Math.max(1, yMax || 0, ...series.flatMap(s => s.values));
    const x = i => n <= 1 ? W : i / (n - 1) * W;
    const y = v => H - 2 - v / peak * (H - 6);
    const box = svg('svg', { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', class: 'chart-svg',
      role: 'img', 'aria-label': title });
    for (const f of [0.5]) box.append(svg('line', { x1: 0, x2: W, y1: y(peak * f), y2: y(peak * f), class: 'chart-grid' }));
    series.forEach((s, k) => {
      if (!s.values.length) return;
      const pts = s.values.map((v, i) => x(i).toFixed(1) + ',' + y(v).toFixed(1));
      if (k === 0) box.append(svg('path', { d: `M0,${H} L${pts.join(' L')} L${W},${H} Z`, class: 'chart-area ' + s.cls }));
      box.append(svg('polyline', { points: pts.join(' '), class: 'chart-line ' + s.cls }));
    });
    const legend = el('div', { cls: 'chart-legend' }, ...series.map(s => el('span', { cls: 'lg ' + s.lg,
      attrs: { 'data-series': s.name } }, s.label + ' ' + fmtInt(s.values.length ? s.values[s.values.length - 1] : 0))));
    const span = n * num(h && h.step_secs || 1);
    return el('figure', { cls: 'chart', attrs: { 'data-chart': id } },
      el('figcaption', null, el('span', null, title), el('span', { cls: 'muted' }, 'peak ' + fmtInt(peak) + ' · last ' + fmtDuration(span))),
      box, legend);
  }

  // Tasks ended per second over the last minute of history, and when the
  // rest would be done at that pace.
  function throughput(m) {
    const h = m.history;
    const done = column(h, 'done'), failed = column(h, 'failed');
    const last = done.slice(-60), lastF = failed.slice(-60);
    const secs = last.length * num(h && h.step_secs || 1);
    if (!secs) return null;
    const rate = (last.reduce((a, b) => a + b, 0) + lastF.reduce((a, b) => a + b, 0)) / secs;
    const left = num(m.tasks_waiting) + num(m.tasks_running);
    return { rate, eta: rate > 0 && left ? left / rate : null };
  }

  function historyPanel(m) {
    const h = m.history;
    if (!h || !column(h, 'done').length) {
      return el('p', { cls: 'muted' }, 'This master sends no history (an older drover).');
    }
    return el('div', { cls: 'charts' },
      chart('done', 'Tasks ended per second', h, [
        { name: 'done', label: 'done', values: column(h, 'done'), cls: 's-done', lg: 'lg-done' },
        { name: 'failed', label: 'failed', values: column(h, 'failed'), cls: 's-failed', lg: 'lg-failed' }]),
      chart('tasks', 'Tasks running and waiting', h, [
        { name: 'running', label: 'running', values: column(h, 'running'), cls: 's-running', lg: 'lg-running' },
        { name: 'waiting', label: 'waiting', values: column(h, 'waiting'), cls: 's-waiting', lg: 'lg-waiting' }]),
      chart('workers', 'Workers connected', h, [
        { name: 'workers', label: 'workers', values: column(h, 'workers'), cls: 's-workers', lg: 'lg-workers' }]),
      chart('cores', 'Cores in use', h, [
        { name: 'cores', label: 'cores', values: column(h, 'cores_inuse'), cls: 's-cores', lg: 'lg-cores' }], num(m.cores_total)));
  }

  function eventsPanel(m, now) {
    const events = Array.isArray(m.events) ? m.events.slice().reverse() : [];
    if (!events.length) return el('p', { cls: 'muted' }, 'Nothing happened yet.');
    const kindCls = k => k === 'task failed' ? 'ev-failed' : k === 'worker lost' ? 'ev-lost' : 'ev-joined';
    return el('ol', { cls: 'events' }, ...events.map(e => {
      const who = [];
      if (e.task != null) who.push('task ' + num(e.task) + (e.tag ? ' (' + String(e.tag) + ')' : ''));
      if (e.host) who.push('on ' + String(e.host));
      if (e.addr) who.push(String(e.addr));
      return el('li', { cls: 'event ' + kindCls(String(e.kind)), attrs: { 'data-kind': String(e.kind) } },
        el('time', { cls: 'muted', title: new Date(num(e.time) * 1000).toLocaleString() }, fmtAge(now - num(e.time))),
        el('span', { cls: 'ev-kind' }, String(e.kind)),
        el('span', { cls: 'ev-who mono' }, who.join(' · ')),
        e.detail ? el('div', { cls: 'ev-detail mono' }, String(e.detail)) : null);
    }));
  }

  function runningPanel(m) {
    const tasks = Array.isArray(m.running) ? m.running : [];
    if (!tasks.length) return el('p', { cls: 'muted' }, 'No task is running.');
    const more = num(m.tasks_running) > tasks.length
      ? el('p', { cls: 'muted' }, 'The ' + fmtInt(tasks.length) + ' longest running of ' + fmtInt(m.tasks_running) + '.') : null;
    return el('div', null, el('table', { cls: 'sub running-tasks' },
      el('thead', null, el('tr', null, ...['Task', 'Tag', 'Category', 'Worker', 'Cores', 'Running for']
        .map((h, i) => el('th', { cls: i === 0 || i >= 4 ? 'num' : '' }, h)))),
      el('tbody', null, ...tasks.map(t => el('tr', null,
        el('td', { cls: 'num', attrs: { 'data-label': 'Task' } }, fmtInt(t.id)),
        el('td', { attrs: { 'data-label': 'Tag' } }, t.tag == null ? '—' : String(t.tag)),
        el('td', { attrs: { 'data-label': 'Category' } }, String(t.category || '—')),
        el('td', { cls: 'mono', attrs: { 'data-label': 'Worker' } }, String(t.host) + (t.addr ? ' (' + String(t.addr) + ')' : '')),
        el('td', { cls: 'num', attrs: { 'data-label': 'Cores' } }, fmtInt(t.cores)),
        el('td', { cls: 'num', attrs: { 'data-label': 'Running for' } }, fmtDuration(num(t.age_secs))))))), more);
  }

  function shapeWords(s) {
    if (s.whole_worker) return 'a whole worker';
    const parts = [fmtInt(s.cores) + (num(s.cores) === 1 ? ' core' : ' cores')];
    if (num(s.memory_mb)) parts.push(fmtMem(s.memory_mb));
    if (num(s.disk_mb)) parts.push(fmtMem(s.disk_mb) + ' disk');
    if (num(s.gpus)) parts.push(fmtInt(s.gpus) + (num(s.gpus) === 1 ? ' GPU' : ' GPUs'));
    return parts.join(', ');
  }

  function renderDetail(key) {
    const box = $('detail');
    const m = state.masters.find(x => keyOf(x) === key);
    if (!m) {
      box.replaceChildren(el('p', { cls: 'empty' },
        state.lastOk ? 'This master is no longer reporting (its entry expired).' : 'Loading…'));
      return;
    }
    const now = nowServer();
    // A stopped master's clock stopped with its last report.
    const until = m.stopped ? num(m.last_update) : now;
    const finished = m.stopped && !num(m.tasks_waiting) && !num(m.tasks_running);
    const head = el('div', { cls: 'detail-head' },
      el('h1', { cls: 'detail-title' }, String(m.project)),
      m.stopped ? el('span', { cls: 'badge badge-stopped' }, 'stopped') : null,
      el('span', { cls: 'detail-pct' }, finished
        ? 'finished: ' + fmtInt(m.tasks_done) + ' done, ' + fmtInt(m.tasks_failed) + ' failed'
        : pct(progress(m)) + ' done'));
    const tp = throughput(m);
    const meta = el('dl', { cls: 'meta' },
      kv('Address', address(m), true),
      m.source_addr && m.source_addr !== m.host ? kv('Seen from', String(m.source_addr), true) : null,
      kv('Owner', String(m.owner || '—')),
      kv('Version', String(m.version || '—')),
      kv(m.stopped ? 'Ran for' : 'Running for', num(m.start_time) ? fmtDuration(until - num(m.start_time)) : '—'),
      kv('Last report', fmtAge(now - num(m.last_update))));
    const tiles = el('div', { cls: 'tiles' },
      statTile('waiting', fmtInt(m.tasks_waiting), 'accent-waiting'),
      num(m.tasks_fit_no_worker) ? statTile('fit no worker', fmtInt(m.tasks_fit_no_worker), 'accent-failed tile-unfit') : null,
      num(m.workers_blocked) ? statTile('workers blocked', fmtInt(m.workers_blocked), 'tile-blocked') : null,
      statTile('running', fmtInt(m.tasks_running), 'accent-running'),
      statTile('done', fmtInt(m.tasks_done), 'accent-done'),
      statTile('failed', fmtInt(m.tasks_failed), 'accent-failed'),
      statTile('workers busy / connected', fmtInt(m.workers_busy) + ' / ' + fmtInt(m.workers_connected)),
      tp && !m.stopped ? statTile('tasks / s (last minute)', tp.rate.toFixed(tp.rate >= 10 ? 0 : 1), 'tile-rate') : null,
      tp && tp.eta != null && !m.stopped ? statTile('left at this pace', fmtDuration(tp.eta), 'tile-eta') : null);
    const meters = el('div', { cls: 'meters' },
      meter('Cores', m.cores_inuse, m.cores_total, fmtInt),
      meter('Memory', m.memory_inuse_mb, m.memory_total_mb, fmtMem),
      num(m.gpus_total) ? meter('GPUs', m.gpus_inuse, m.gpus_total, fmtInt) : null);

    const cats = Array.isArray(m.categories) ? m.categories : [];
    const catTable = cats.length ? el('table', { cls: 'sub' },
      el('thead', null, el('tr', null, ...['Category', 'Waiting', 'Running', 'Done', 'Failed', 'Progress', 'Allocation']
        .map((h, i) => el('th', { cls: i >= 1 && i <= 4 ? 'num' : '' }, h)))),
      el('tbody', null, ...cats.map(c => {
        const asMaster = { tasks_done: c.done, tasks_failed: c.failed, tasks_running: c.running, tasks_waiting: c.waiting };
        // A master that does not count tasks per category leaves the counts
        // out: show a dash, not a zero that would read as "no tasks".
        const counted = ['waiting', 'running', 'done', 'failed'].some(k => c[k] != null);
        const count = v => v == null ? '—' : fmtInt(v);
        return el('tr', null,
          el('td', { attrs: { 'data-label': 'Category' } }, String(c.name)),
          el('td', { cls: 'num', attrs: { 'data-label': 'Waiting' } }, count(c.waiting)),
          el('td', { cls: 'num', attrs: { 'data-label': 'Running' } }, count(c.running)),
          el('td', { cls: 'num', attrs: { 'data-label': 'Done' } }, count(c.done)),
          el('td', { cls: 'num', attrs: { 'data-label': 'Failed' } }, count(c.failed)),
          el('td', { cls: 'col-progress', attrs: { 'data-label': 'Progress' } },
            counted ? el('div', { cls: 'progress-cell' }, progressBar(asMaster, false), el('span', { cls: 'pct' }, pct(progress(asMaster)))) : '—'),
          el('td', { cls: 'muted', attrs: { 'data-label': 'Allocation' } }, c.allocation == null ? '—' : String(c.allocation)));
      }))) : el('p', { cls: 'muted' }, 'No categories reported.');

    const workers = Array.isArray(m.workers) ? m.workers : [];
    const workerTable = workers.length ? el('table', { cls: 'sub workers' },
      el('thead', null, el('tr', null, ...['Worker', 'Address', 'Cores used / offered', 'Memory', 'Disk', 'Tasks running', 'Tasks ended', 'Connected for']
        .map((h, i) => el('th', { cls: i >= 2 ? 'num' : '' }, h)))),
      el('tbody', null, ...workers.map(w => el('tr', null,
        el('td', { cls: 'mono', attrs: { 'data-label': 'Worker' } }, String(w.host)),
        el('td', { cls: 'mono', attrs: { 'data-label': 'Address' } }, w.addr ? String(w.addr) : '—'),
        el('td', { cls: 'num', attrs: { 'data-label': 'Cores used / offered' } }, (w.addr ? fmtInt(w.cores_inuse) + ' / ' : '') + fmtInt(w.cores)),
        el('td', { cls: 'num', attrs: { 'data-label': 'Memory' } }, fmtMem(w.memory_mb)),
        el('td', { cls: 'num', attrs: { 'data-label': 'Disk' } }, num(w.disk_mb) ? fmtMem(w.disk_mb) : '—'),
        el('td', { cls: 'num', attrs: { 'data-label': 'Tasks running' } }, fmtInt(w.running)),
        el('td', { cls: 'num', attrs: { 'data-label': 'Tasks ended' } }, w.addr ? fmtInt(w.tasks_ended) : '—'),
        el('td', { cls: 'num', attrs: { 'data-label': 'Connected for' } }, w.addr ? fmtDuration(num(w.connected_secs)) : '—'))))) :
      el('p', { cls: 'muted' }, 'No workers connected.');
    const moreWorkers = num(m.workers_connected) > workers.length && workers.length
      ? el('p', { cls: 'muted' }, 'Showing ' + fmtInt(workers.length) + ' of ' + fmtInt(m.workers_connected) + ' workers.') : null;

    // What the queue is waiting for, by task size: tells an operator which
    // workers would help. Only shown when the master reports it.
    const shapes = Array.isArray(m.waiting_shapes) ? m.waiting_shapes : [];
    const shapeTable = shapes.length ? el('table', { cls: 'sub shapes' },
      el('thead', null, el('tr', null, ...['Each task needs', 'Cores', 'Memory', 'Disk', 'GPUs', 'Tasks waiting']
        .map((h, i) => el('th', { cls: i ? 'num' : '' }, h)))),
      el('tbody', null, ...shapes.map(s => el('tr', null,
        el('td', { attrs: { 'data-label': 'Each task needs' } }, shapeWords(s)),
        el('td', { cls: 'num', attrs: { 'data-label': 'Cores' } }, s.whole_worker ? '—' : fmtInt(s.cores)),
        el('td', { cls: 'num', attrs: { 'data-label': 'Memory' } }, s.whole_worker || !num(s.memory_mb) ? '—' : fmtMem(s.memory_mb)),
        el('td', { cls: 'num', attrs: { 'data-label': 'Disk' } }, s.whole_worker || !num(s.disk_mb) ? '—' : fmtMem(s.disk_mb)),
        el('td', { cls: 'num', attrs: { 'data-label': 'GPUs' } }, s.whole_worker ? '—' : fmtInt(s.gpus)),
        el('td', { cls: 'num', attrs: { 'data-label': 'Tasks waiting' } }, fmtInt(s.count)))))) : null;

    box.replaceChildren(
      head,
      progressBar(m, true),
      el('div', { cls: 'legend' },
        el('span', { cls: 'lg lg-done' }, 'done'), el('span', { cls: 'lg lg-failed' }, 'failed'),
        el('span', { cls: 'lg lg-running' }, 'running'), el('span', { cls: 'lg lg-waiting' }, 'waiting')),
      tiles,
      el('div', { cls: 'detail-grid' },
        el('section', { cls: 'panel' }, el('h2', null, 'Resources'), meters),
        el('section', { cls: 'panel' }, el('h2', null, 'Master'), meta)),
      el('section', { cls: 'panel', attrs: { id: 'panel-history' } }, el('h2', null, 'History'), historyPanel(m)),
      el('div', { cls: 'detail-grid' },
        el('section', { cls: 'panel', attrs: { id: 'panel-events' } }, el('h2', null, 'Recent events'), eventsPanel(m, now)),
        el('section', { cls: 'panel', attrs: { id: 'panel-running' } }, el('h2', null, 'Running tasks'), runningPanel(m))),
      el('section', { cls: 'panel', attrs: { id: 'panel-categories' } }, el('h2', null, 'Categories'), catTable),
      el('section', { cls: 'panel', attrs: { id: 'panel-workers' } }, el('h2', null, 'Workers'), workerTable, moreWorkers),
      ...(shapeTable ? [el('section', { cls: 'panel' }, el('h2', null, 'Waiting tasks by size'), shapeTable)] : []));
    document.title = String(m.project) + ' · drover catalog';
  }

  function renderFooter() {
    const s = state.stats;
    const parts = ['drover catalog'];
    if (s) {
      parts[0] += ' ' + String(s.version || '');
      parts.push(fmtInt(s.entries) + ' / ' + fmtInt(s.max_entries) + ' entries');
      parts.push('entries expire after ' + fmtDuration(num(s.expiry_secs)));
      parts.push(fmtInt(num(s.udp_received) + num(s.http_received)) + ' reports received');
      const dropped = num(s.dropped_malformed) + num(s.dropped_oversized);
      if (dropped) parts.push(fmtInt(dropped) + ' dropped');
    }
    $('foot').textContent = parts.join(' · ');
  }

  // ---- routing and events ----

  function parseRoute() {
    const h = location.hash || '#/';
    if (h.startsWith('#/master/')) {
      try { return { view: 'detail', key: decodeURIComponent(h.slice('#/master/'.length)) }; } catch (_) { /* fall through */ }
    }
    return { view: 'list' };
  }

  function openMaster(key) { location.hash = '#/master/' + encodeURIComponent(key); }

  function init() {
    const filter = $('filter');
    filter.value = state.filter;
    filter.addEventListener('input', () => {
      state.filter = filter.value;
      sessionStorage.setItem('drover.filter', state.filter);
      renderList();
    });
    for (const th of document.querySelectorAll('#masters th[data-sort]')) {
      th.querySelector('button').addEventListener('click', () => {
        const k = th.getAttribute('data-sort');
        if (state.sortKey === k) state.sortDir = state.sortDir === 'asc' ? 'desc' : 'asc';
        else { state.sortKey = k; state.sortDir = k === 'project' || k === 'address' ? 'asc' : 'desc'; }
        localStorage.setItem('drover.sortKey', state.sortKey);
        localStorage.setItem('drover.sortDir', state.sortDir);
        renderList();
      });
    }
    const body = $('masters-body');
    body.addEventListener('click', e => {
      const tr = e.target.closest('tr[data-key]');
      if (tr) openMaster(tr.getAttribute('data-key'));
    });
    body.addEventListener('keydown', e => {
      if (e.key !== 'Enter' && e.key !== ' ') return;
      const tr = e.target.closest('tr[data-key]');
      if (tr) { e.preventDefault(); openMaster(tr.getAttribute('data-key')); }
    });
    window.addEventListener('hashchange', () => {
      document.title = 'drover catalog';
      render();
      window.scrollTo(0, 0);
    });
    document.addEventListener('keydown', e => {
      if (e.key === 'Escape' && parseRoute().view === 'detail') location.hash = '#/';
      else if (e.key === '/' && document.activeElement !== filter && parseRoute().view === 'list') {
        e.preventDefault();
        filter.focus();
      }
    });
    render();
    poll();
  }

  init();
})();
