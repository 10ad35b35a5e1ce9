// Headless Chromium test of the drover catalog status page.
//
// It starts the real catalog binary, feeds it reports from a stand-in for a
// master (plain UDP datagrams and HTTP POSTs sent from this file, with the
// same JSON a drover master sends), and checks what a person would see.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { mkdirSync, mkdtempSync, existsSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, '..', '..');
const artifacts = path.join(here, 'artifacts');
const HOSTILE = '<script>alert(1)</script>';

// Which binary to run: the stand-alone catalog bin, or the main drover
// binary once it has the `catalog` subcommand.
function catalogCommand() {
  if (process.env.DROVER_CATALOG_BIN) return [process.env.DROVER_CATALOG_BIN, 'serve'];
  if (process.env.DROVER_BIN) return [process.env.DROVER_BIN, 'catalog'];
  const targets = [process.env.CARGO_TARGET_DIR, path.join(repo, 'target')].filter(Boolean);
  for (const t of targets) {
    for (const profile of ['debug', 'release']) {
      const p = path.join(t, profile, 'drover-catalog');
      if (existsSync(p)) return [p, 'serve'];
    }
  }
  throw new Error('set DROVER_CATALOG_BIN (or DROVER_BIN) to the binary to test; see README.md');
}

// The main drover binary, for the test that runs a real master.
function droverBin() {
  if (process.env.DROVER_BIN) return process.env.DROVER_BIN;
  const targets = [process.env.CARGO_TARGET_DIR, path.join(repo, 'target')].filter(Boolean);
  for (const t of targets) {
    for (const profile of ['debug', 'release']) {
      const p = path.join(t, profile, 'drover');
      if (existsSync(p)) return p;
    }
  }
  throw new Error('set DROVER_BIN to the drover binary: one test runs a real `drover run`');
}

let catalog, port, browser, stateDir;
const dialogs = [];

function startCatalog() {
  const [bin, sub] = catalogCommand();
  stateDir = mkdtempSync(path.join(tmpdir(), 'drover-catalog-browser-'));
  const child = spawn(bin, [sub, '--port', '0', '--bind', '127.0.0.1',
    '--state-file', path.join(stateDir, 'state.json')], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error('catalog did not start: ' + out)), 15000);
    child.on('exit', code => reject(new Error('catalog exited early with ' + code + ': ' + out)));
    child.stdout.on('data', d => {
      out += d;
      const m = out.match(/listening on [^\s]*:(\d+)/);
      if (m) {
        clearTimeout(timer);
        resolve({ child, port: Number(m[1]) });
      }
    });
  });
}

// ---- the stand-in for a master ----

function report(project, counts, extra = {}) {
  return {
    kind: 'drover-master', project, host: '127.0.0.1', port: 9123, owner: 'alice',
    version: '0.1.0', start_time: Math.floor(Date.now() / 1000) - 3725,
    tasks_waiting: 0, tasks_running: 0, tasks_done: 0, tasks_failed: 0,
    workers_connected: 0, workers_busy: 0, cores_inuse: 0, cores_total: 0,
    memory_inuse_mb: 0, memory_total_mb: 0, gpus_inuse: 0, gpus_total: 0,
    categories: [], workers: [], ...counts, ...extra,
  };
}

function sendUdp(r) {
  return new Promise((resolve, reject) => {
    const s = createSocket('udp4');
    s.send(Buffer.from(JSON.stringify(r)), port, '127.0.0.1', err => {
      s.close();
      if (err) reject(err); else resolve();
    });
  });
}

async function post(r) {
  const res = await fetch(`http://127.0.0.1:${port}/update`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(r),
  });
  assert.equal(res.status, 200, await res.text());
}

async function waitForEntry(project, pred = () => true) {
  for (let i = 0; i < 100; i++) {
    const list = await (await fetch(`http://127.0.0.1:${port}/query.json`)).json();
    const e = list.find(m => m.project === project);
    if (e && pred(e)) return e;
    await new Promise(r => setTimeout(r, 50));
  }
  throw new Error('catalog never showed ' + project);
}

const genome = (done, running, waiting) => report('genome-assembly', {
  tasks_waiting: waiting, tasks_running: running, tasks_done: done, tasks_failed: 3,
  workers_connected: 12, workers_busy: 11, cores_inuse: 44, cores_total: 48,
  memory_inuse_mb: 150000, memory_total_mb: 196608, gpus_inuse: 2, gpus_total: 4,
  categories: [
    { name: 'align', waiting: Math.floor(waiting / 2), running: 30, done: Math.floor(done / 2), failed: 2, allocation: 'bucketing: 3 buckets' },
    { name: 'assemble', waiting: waiting - Math.floor(waiting / 2), running: running - 30, done: done - Math.floor(done / 2), failed: 1, allocation: null },
  ],
  workers: Array.from({ length: 12 }, (_, i) => ({
    host: `node${String(i + 1).padStart(2, '0')}.cluster.example.org`, cores: 4, memory_mb: 16384, running: i < 11 ? 4 : 0,
  })),
  waiting_shapes: [
    { cores: 1, memory_mb: 2048, disk_mb: 0, gpus: 0, whole_worker: false, count: waiting - 7 },
    { cores: 4, memory_mb: 16000, disk_mb: 5000, gpus: 1, whole_worker: false, count: 5 },
    { cores: 0, memory_mb: 0, disk_mb: 0, gpus: 0, whole_worker: true, count: 2 },
  ],
});

before(async () => {
  mkdirSync(artifacts, { recursive: true });
  ({ child: catalog, port } = await startCatalog());
  await sendUdp(genome(120, 44, 300));
  await sendUdp(report('climate-ensemble', {
    tasks_waiting: 12, tasks_running: 8, tasks_done: 960, tasks_failed: 20,
    workers_connected: 4, workers_busy: 4, cores_inuse: 8, cores_total: 16,
    memory_inuse_mb: 8000, memory_total_mb: 65536,
  }, { owner: 'bob', port: 9200 }));
  await sendUdp(report('protein-fold-sweep', {
    tasks_waiting: 900, tasks_running: 0, tasks_done: 0, workers_connected: 0,
  }, { owner: 'carol', port: 9300 }));
  // The hostile name goes through HTTP, the other way in.
  await post(report(HOSTILE, {
    tasks_waiting: 1, tasks_running: 1, tasks_done: 1, workers_connected: 1, workers_busy: 1,
    categories: [{ name: '<img src=x onerror=alert(2)>', waiting: 1, running: 1, done: 1, failed: 0, allocation: '<b>bold</b>' }],
    workers: [{ host: '"><svg onload=alert(3)>', cores: 1, memory_mb: 1, running: 1 }],
  }, { owner: '<i>mallory</i>', port: 9666 }));
  await waitForEntry(HOSTILE);
  await waitForEntry('genome-assembly');
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
});

after(async () => {
  await browser?.close();
  if (catalog && catalog.exitCode === null) {
    const exited = new Promise(r => catalog.once('exit', r));
    catalog.kill('SIGTERM');
    await exited;
  }
  if (stateDir) rmSync(stateDir, { recursive: true, force: true });
});

async function openPage(viewport) {
  const context = await browser.newContext({ viewport, colorScheme: 'dark' });
  const page = await context.newPage();
  page.on('dialog', d => { dialogs.push(d.message()); d.dismiss().catch(() => {}); });
  const errors = [];
  page.on('pageerror', e => errors.push(String(e)));
  await page.goto(`http://127.0.0.1:${port}/`);
  return { page, context, errors };
}

const row = (page, project) => page.locator('#masters-body tr', {
  has: page.locator('.project-name', { hasText: project }),
});

test('the status page shows the masters and their counts, and follows new reports live', async () => {
  const { page, context, errors } = await openPage({ width: 1360, height: 900 });
  const r = row(page, 'genome-assembly');
  await r.waitFor();
  assert.equal(await r.locator('td[data-col="tasks_waiting"]').textContent(), '300');
  assert.equal(await r.locator('td[data-col="tasks_running"]').textContent(), '44');
  assert.equal(await r.locator('td[data-col="tasks_done"]').textContent(), '120');
  assert.equal(await r.locator('td[data-col="tasks_failed"]').textContent(), '3');
  assert.equal(await r.locator('td[data-col="workers"]').textContent(), '11 / 12');
  assert.equal(await r.locator('td[data-col="cores"]').textContent(), '44 / 48');
  assert.equal(await r.locator('.pct').textContent(), '26%'); // 120 / 467
  assert.equal(await page.locator('#t-masters').textContent(), '4');

  // Tasks finish: the same page (no reload) must show the new numbers.
  await page.evaluate(() => { window.__notReloaded = true; });
  await sendUdp(genome(400, 44, 20));
  await page.waitForFunction(() => {
    const tr = [...document.querySelectorAll('#masters-body tr')]
      .find(t => t.querySelector('.project-name')?.textContent === 'genome-assembly');
    return tr?.querySelector('td[data-col="tasks_done"]')?.textContent === '400';
  }, null, { timeout: 10000 });
  assert.equal(await r.locator('td[data-col="tasks_waiting"]').textContent(), '20');
  assert.equal(await r.locator('.pct').textContent(), '86%'); // 400 / 467
  assert.equal(await page.evaluate(() => window.__notReloaded), true);

  // Let the "changed" highlight fade before the picture is taken.
  await page.waitForTimeout(1800);
  await page.screenshot({ path: path.join(artifacts, 'status-page.png'), fullPage: true });
  assert.deepEqual(errors, []);
  await context.close();
});

test('a hostile project name renders as text and runs nothing', async () => {
  const { page, context, errors } = await openPage({ width: 1360, height: 900 });
  const r = row(page, HOSTILE);
  await r.waitFor();
  assert.equal(await r.locator('.project-name').textContent(), HOSTILE);
  assert.equal(await r.locator('.owner').textContent(), '<i>mallory</i>');
  // The only script on the page is the app itself.
  assert.equal(await page.locator('script').count(), 1);
  assert.equal(await page.locator('#masters-body i, #masters-body img, #masters-body svg').count(), 0);

  // Its detail view puts categories and workers on the page as text too.
  await r.click();
  await page.locator('.detail-title').waitFor();
  assert.equal(await page.locator('.detail-title').textContent(), HOSTILE);
  const detail = page.locator('#detail');
  assert.ok((await detail.textContent()).includes('<img src=x onerror=alert(2)>'));
  assert.ok((await detail.textContent()).includes('"><svg onload=alert(3)>'));
  assert.equal(await detail.locator('img, svg, b, script').count(), 0);
  await page.waitForTimeout(500);
  assert.deepEqual(dialogs, []);
  assert.deepEqual(errors, []);
  await context.close();
});

test('filter, sort and the detail view', async () => {
  const { page, context } = await openPage({ width: 1360, height: 900 });
  await row(page, 'genome-assembly').waitFor();
  await page.fill('#filter', '^clim');
  await page.waitForFunction(() => document.querySelectorAll('#masters-body tr').length === 1);
  assert.equal(await page.locator('#masters-body .project-name').textContent(), 'climate-ensemble');
  await page.fill('#filter', '');
  await page.waitForFunction(() => document.querySelectorAll('#masters-body tr').length === 4);

  // Sort by done, most first, then least first.
  await page.click('th[data-sort="tasks_done"] button');
  const order = () => page.locator('#masters-body .project-name').allTextContents();
  assert.deepEqual((await order())[0], 'climate-ensemble');
  await page.click('th[data-sort="tasks_done"] button');
  assert.deepEqual((await order())[0], 'protein-fold-sweep');
  assert.equal(await page.getAttribute('th[data-sort="tasks_done"]', 'aria-sort'), 'ascending');

  await row(page, 'genome-assembly').click();
  await page.locator('.detail-title').waitFor();
  const detail = page.locator('#detail');
  assert.equal(await page.locator('.detail-title').textContent(), 'genome-assembly');
  assert.equal(await detail.locator('table.sub').nth(1).locator('tbody tr').count(), 12);
  assert.ok((await detail.textContent()).includes('node01.cluster.example.org'));
  assert.ok((await detail.textContent()).includes('bucketing: 3 buckets'));
  // What the queue waits for, by task size.
  const shapes = detail.locator('table.shapes tbody tr');
  assert.equal(await shapes.count(), 3);
  assert.deepEqual(await shapes.nth(0).locator('td').allTextContents(),
    ['1 core, 2.0 GB', '1', '2.0 GB', '—', '0', '13']); // 20 waiting (the first test's last report) - 7
  assert.equal(await shapes.nth(2).locator('td').first().textContent(), 'a whole worker');
  await page.waitForTimeout(300);
  await page.screenshot({ path: path.join(artifacts, 'status-page-detail.png'), fullPage: true });
  await page.click('a.back');
  await row(page, 'genome-assembly').waitFor();
  await context.close();
});

test('the page reads on a phone', async () => {
  const { page, context } = await openPage({ width: 390, height: 844 });
  await row(page, 'genome-assembly').waitFor();
  // No sideways scrolling: the table turned into cards that fit the screen.
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `page is ${overflow}px wider than the phone`);
  await page.screenshot({ path: path.join(artifacts, 'status-page-phone.png'), fullPage: true });
  await context.close();
});

// The row of `project` as the page shows it, read inside the page.
function rowCells(page, project) {
  return page.evaluate(p => {
    const tr = [...document.querySelectorAll('#masters-body tr')]
      .find(t => t.querySelector('.project-name')?.textContent === p);
    if (!tr) return null;
    const cells = {};
    for (const td of tr.querySelectorAll('td[data-col]')) cells[td.dataset.col] = td.textContent;
    cells.stopped = !!tr.querySelector('.badge-stopped');
    return cells;
  }, project);
}

async function waitForRow(page, project, what, pred) {
  let last = null;
  for (let i = 0; i < 600; i++) {
    last = await rowCells(page, project);
    if (last && pred(last)) return last;
    await page.waitForTimeout(100);
  }
  throw new Error(`the page never showed ${what} for ${project}; last: ${JSON.stringify(last)}`);
}

test('a real drover run reports to the catalog and the page follows its tasks', async () => {
  // A real master (drover run) with a real worker process. Four quick tasks,
  // then six that wait for a gate file: with a 2-core worker the page must
  // settle on 4 done, 2 running, 4 waiting until the gate opens.
  const dir = mkdtempSync(path.join(tmpdir(), 'drover-browser-run-'));
  const gate = path.join(dir, 'gate');
  const lines = [];
  for (let i = 0; i < 4; i++) lines.push('true');
  for (let i = 0; i < 6; i++) lines.push(`while [ ! -e '${gate}' ]; do sleep 0.05; done`);
  writeFileSync(path.join(dir, 'tasks.txt'), lines.join('\n') + '\n');
  const project = `real-run-${process.pid}`;
  const run = spawn(droverBin(), ['run', '--workers', '1', '--cores', '2',
    '--catalog', `127.0.0.1:${port}`, '--project', project, '--catalog-interval', '0.2',
    '--failed-dir', path.join(dir, 'failed'), path.join(dir, 'tasks.txt')],
  { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  let runErr = '';
  run.stderr.on('data', d => { runErr += d; });
  const exited = new Promise(resolve => run.once('exit', code => resolve(code)));
  const { page, context, errors } = await openPage({ width: 1360, height: 900 });
  try {
    const held = await waitForRow(page, project, '4 done, 2 running, 4 waiting',
      c => c.tasks_done === '4' && c.tasks_running === '2' && c.tasks_waiting === '4');
    assert.equal(held.workers, '1 / 1');
    assert.equal(held.cores, '2 / 2');
    assert.equal(held.stopped, false);
    await page.evaluate(() => { window.__notReloaded = true; });

    writeFileSync(gate, '');
    assert.equal(await exited, 0, runErr);
    // Its last report says it stopped, with every task done.
    const end = await waitForRow(page, project, 'the stopped run',
      c => c.stopped && c.tasks_done === '10');
    assert.equal(end.tasks_waiting, '0');
    assert.equal(end.tasks_running, '0');
    assert.equal(end.tasks_failed, '0');
    assert.equal(await page.evaluate(() => window.__notReloaded), true);
    await page.waitForTimeout(1800);
    await page.screenshot({ path: path.join(artifacts, 'status-page-real-run.png'), fullPage: true });
    assert.deepEqual(errors, []);
  } finally {
    await context.close();
    if (run.exitCode === null) run.kill();
    rmSync(dir, { recursive: true, force: true });
  }
});

// The detail panels as the page shows them, read inside the page.
function detailPanels(page) {
  return page.evaluate(() => {
    const rows = sel => [...document.querySelectorAll(sel)].map(tr =>
      [...tr.querySelectorAll('td')].map(td => td.textContent));
    return {
      events: [...document.querySelectorAll('#panel-events .event')].map(li => ({
        kind: li.dataset.kind, text: li.textContent })),
      running: rows('#panel-running tbody tr'),
      workers: rows('#panel-workers tbody tr'),
      categories: rows('#panel-categories tbody tr'),
      charts: [...document.querySelectorAll('#panel-history [data-chart]')].map(f => ({
        id: f.dataset.chart,
        legend: [...f.querySelectorAll('[data-series]')].map(s => s.textContent),
        points: f.querySelector('polyline')?.getAttribute('points')?.split(' ').length || 0,
      })),
    };
  });
}

async function waitForPanels(page, what, pred) {
  let last = null;
  for (let i = 0; i < 600; i++) {
    last = await detailPanels(page);
    if (pred(last)) return last;
    await page.waitForTimeout(100);
  }
  throw new Error(`the page never showed ${what}; last: ${JSON.stringify(last)}`);
}

function waitForLine(child, re, what) {
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`no ${what} in: ${out}`)), 30000);
    child.stderr.on('data', d => {
      out += d;
      const m = out.match(re);
      if (m) { clearTimeout(timer); resolve(m); }
    });
  });
}

test('each panel of a real run: history, events with a killed worker and a failed task, running tasks, workers, categories', async () => {
  // A real master waiting for remote workers, two real worker processes of
  // 2 cores each. One task fails at once with a message on stderr, two
  // succeed, three hold cores until a gate file appears (one core stays
  // free, so the quick ones never wait behind them); then a worker is killed.
  const dir = mkdtempSync(path.join(tmpdir(), 'drover-browser-panels-'));
  const gate = path.join(dir, 'gate');
  const lines = [JSON.stringify({ command: 'echo reading sample 7 >&2; echo no such input: s7.fq >&2; exit 3', tag: 'bad-sample', category: 'align' })];
  for (let i = 0; i < 2; i++) lines.push(JSON.stringify({ command: 'true', category: 'align' }));
  for (let i = 0; i < 3; i++) lines.push(JSON.stringify({ command: `while [ ! -e '${gate}' ]; do sleep 0.05; done`, category: 'sim', cores: 1 }));
  writeFileSync(path.join(dir, 'tasks.jsonl'), lines.join('\n') + '\n');
  const project = `panels-${process.pid}`;
  const bin = droverBin();
  // A gate task sent ahead to the first worker to join is recalled to the
  // second when that one has room, so all three gate tasks run.
  const run = spawn(bin, ['run', '--workers', '0', '--port', '0',
    '--catalog', `127.0.0.1:${port}`, '--project', project, '--catalog-interval', '0.2',
    '--failed-dir', path.join(dir, 'failed'), path.join(dir, 'tasks.jsonl')],
  { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  const exited = new Promise(resolve => run.once('exit', code => resolve(code)));
  const workers = [];
  const { page, context, errors } = await openPage({ width: 1280, height: 900 });
  try {
    const [, masterPort] = await waitForLine(run, /waiting for workers on port (\d+)/, 'port');
    for (const name of ['a', 'b']) {
      mkdirSync(path.join(dir, 'w-' + name));
      workers.push(spawn(bin, ['worker', `127.0.0.1:${masterPort}`, '--cores', '2', '--memory', '1000',
        '--workdir', path.join(dir, 'w-' + name)], { stdio: 'ignore' }));
    }
    const entry = await waitForEntry(project);
    await page.goto(`http://127.0.0.1:${port}/#/master/` + encodeURIComponent(
      [entry.kind, entry.host, entry.port, entry.project].join('|')));
    const busy = await waitForPanels(page, 'the failed task, two done and three running',
      p => p.running.length === 3 && p.events.some(e => e.kind === 'task failed')
        && p.events.filter(e => e.kind === 'worker joined').length === 2
        && p.categories.some(r => r[0] === 'align' && r[3] === '2'));
    const failed = busy.events.find(e => e.kind === 'task failed');
    assert.match(failed.text, /bad-sample/);
    assert.match(failed.text, /exit 3/);
    assert.match(failed.text, /no such input: s7\.fq/);
    // Two workers on one host told apart by their address.
    assert.equal(busy.workers.length, 2);
    assert.notEqual(busy.workers[0][1], busy.workers[1][1]);
    assert.match(busy.workers[0][1], /^127\.0\.0\.1:\d+$/);
    // Busiest first; running means started (nothing is sent ahead here).
    assert.equal(busy.workers[0][2], '2 / 2');
    assert.deepEqual(busy.workers.map(w => w[5]), ['2', '1']);
    // Every running task names its worker; all are the gate tasks of 'sim'.
    assert.ok(busy.running.every(r => r[2] === 'sim' && /127\.0\.0\.1:\d+/.test(r[3])), JSON.stringify(busy.running));
    // Per-category counts, not dashes.
    const cat = name => busy.categories.find(r => r[0] === name);
    assert.deepEqual(cat('align').slice(1, 5), ['0', '0', '2', '1']);
    assert.deepEqual(cat('sim').slice(1, 5), ['0', '3', '0', '0']);
    assert.deepEqual(busy.charts.map(c => c.id), ['done', 'tasks', 'workers', 'cores']);

    // Kill one worker: the page says which one was lost, and its tasks wait again.
    const victim = workers[1];
    victim.kill('SIGKILL');
    const after = await waitForPanels(page, 'the lost worker',
      p => p.events.some(e => e.kind === 'worker lost') && p.workers.length === 1
        && p.charts.find(c => c.id === 'workers')?.legend[0] === 'workers 1');
    const lost = after.events.find(e => e.kind === 'worker lost');
    const survivor = after.workers[0][1];
    const gone = busy.workers.map(w => w[1]).find(a => a !== survivor);
    assert.ok(lost.text.includes(gone), `${lost.text} should name ${gone}`);
    // The newest event is listed first.
    assert.equal(after.events[0].kind, 'worker lost');
    const chart = after.charts.find(c => c.id === 'workers');
    assert.ok(chart.points >= 2, JSON.stringify(chart));
    await page.waitForTimeout(1800);
    await page.screenshot({ path: path.join(artifacts, 'status-page-panels.png'), fullPage: true });
    // The picture README shows (docs/status-page.jpg is a copy of this one).
    await page.screenshot({ path: path.join(artifacts, 'status-page-panels.jpg'), fullPage: true,
      type: 'jpeg', quality: 70 });

    writeFileSync(gate, '');
    assert.equal(await exited, 1);
    assert.deepEqual(errors, []);
  } finally {
    await context.close();
    writeFileSync(gate, '');
    if (run.exitCode === null) run.kill();
    for (const w of workers) if (w.exitCode === null && w.signalCode === null) w.kill();
    rmSync(dir, { recursive: true, force: true });
  }
});
