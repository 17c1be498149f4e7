// warden's admin page: polls /admin/tree and /readyz, draws the tree, and sends operator
// actions after an in-page confirmation. Plain DOM, no framework; every text goes through
// textContent, never HTML. The admin token, once typed, is kept in this tab only.
'use strict';

const POLL_MS = 500; // the tree and readiness, every half second
const TICK_MS = 100; // countdowns and uptimes, between polls
const TIMEOUT_MS = 3000; // a request slower than this counts as warden unreachable
const TOKEN_KEY = 'warden.admin_token';
const ACTIONS = ['restart', 'stop', 'start', 'kill'];
const WHAT = {
  restart: 'It is stopped and started again.',
  stop: 'It stays down until started.',
  start: 'It is started again (a stopped or parked child).',
  kill: 'It is killed at once; its supervisor restarts it by its policy.',
};

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(TOKEN_KEY) || '';
let paused = false; // polling waits for a token after a 401
let inFlight = false; // a poll is running; it schedules the next one
let again = false; // poll again as soon as the running poll ends
let timer = null;
let pending = null; // {path, action, button} while the confirmation is open
const rows = new Map(); // path -> that node's elements, kept across polls

// ---- HTTP -------------------------------------------------------------------------

async function request(method, url) {
  const response = await fetch(url, {
    method,
    headers: token ? { Authorization: 'Bearer ' + token } : {},
    cache: 'no-store',
    credentials: 'omit',
    signal: AbortSignal.timeout(TIMEOUT_MS),
  });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  return { status: response.status, ok: response.ok, body };
}

// The message of warden's one error shape, {"error":{"code","message"}}.
function errorText(r) {
  const e = r.body && r.body.error;
  return e && e.message ? e.message : 'HTTP ' + r.status;
}

// ---- polling ----------------------------------------------------------------------

async function poll() {
  if (inFlight) { again = true; return; }
  inFlight = true;
  clearTimeout(timer);
  const began = performance.now();
  try { await pollOnce(); } finally { inFlight = false; }
  if (paused) return;
  const wait = again ? 0 : Math.max(0, POLL_MS - (performance.now() - began));
  again = false;
  timer = setTimeout(poll, wait);
}

async function pollOnce() {
  const [tree, ready] = await Promise.allSettled([
    request('GET', '/admin/tree'),
    request('GET', '/readyz'),
  ]);
  showReadiness(ready.status === 'fulfilled' ? ready.value : null);
  if (tree.status === 'rejected') {
    showConnError('warden unreachable (' + tree.reason.message + '); retrying');
    return;
  }
  const r = tree.value;
  if (r.status === 401) { needToken(errorText(r)); return; }
  if (!r.ok || !r.body) { showConnError('cannot read the tree: ' + errorText(r) + '; retrying'); return; }
  showConnError(null);
  $('auth-needed').hidden = true;
  $('token-forget').hidden = !token;
  render(r.body);
  showConfig(r.body.config);
  $('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
}

function showConnError(text) {
  const el = $('conn-error');
  el.hidden = !text;
  el.textContent = text || '';
  document.body.classList.toggle('stale', !!text);
}

function showReadiness(r) {
  const el = $('readiness');
  if (r && r.body && r.body.status === 'ready') {
    el.textContent = 'ready';
    el.className = 'pill ready-yes';
  } else if (r && r.body && r.body.status === 'not_ready') {
    el.textContent = 'not ready: ' + (r.body.failing || []).join(', ');
    el.className = 'pill ready-no';
  } else {
    el.textContent = 'readiness unknown' + (r ? ': ' + errorText(r) : '');
    el.className = 'pill';
  }
}

function showConfig(config) {
  const el = $('config-generation');
  el.hidden = !(config && config.generation != null);
  if (!el.hidden) {
    const pending = config.pending_restart || [];
    el.textContent = 'config generation ' + config.generation +
      (config.applied_at ? ', applied ' + config.applied_at : '') +
      (pending.length ? '; waiting for a restart: ' + pending.join(', ') : '');
  }
}

// ---- the token --------------------------------------------------------------------

// A 401: drop what was shown, ask for the token once, and wait for it.
function needToken(message) {
  paused = true;
  clearTree();
  showConfig(null);
  const shown = !$('auth-needed').hidden;
  $('auth-message').textContent = (token ? 'The admin token was refused' : 'This page needs the admin token') +
    ' (' + message + '). Enter the admin token:';
  $('auth-needed').hidden = false;
  $('token-forget').hidden = !token;
  if (!shown) $('token-input').focus();
}

$('token-form').addEventListener('submit', (e) => {
  e.preventDefault(); // never navigate (form-action 'none' too)
  const value = $('token-input').value.trim();
  if (!value) return;
  token = value;
  sessionStorage.setItem(TOKEN_KEY, token);
  $('token-input').value = '';
  $('auth-needed').hidden = true;
  paused = false;
  poll();
});

$('token-forget').addEventListener('click', () => {
  token = '';
  sessionStorage.removeItem(TOKEN_KEY);
  $('token-forget').hidden = true;
  clearTree();
  paused = false;
  poll();
});

// ---- the tree ---------------------------------------------------------------------

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text) e.textContent = text;
  return e;
}

function setText(e, text) {
  if (e.textContent !== text) e.textContent = text;
}

// Shows `e` (or the labelled field around it) with `text`, or hides it when text is empty.
function show(e, text) {
  const box = e.parentElement.classList.contains('field') ? e.parentElement : e;
  box.hidden = !text;
  setText(e, text || '');
}

// `1234` -> `1.2s`, `61000` -> `1m1s`: as the text drawing of the tree.
function human(ms) {
  ms = Math.max(0, Math.floor(ms));
  if (ms < 1000) return ms + 'ms';
  if (ms < 60000) return (ms / 1000).toFixed(1) + 's';
  if (ms < 3600000) return Math.floor(ms / 60000) + 'm' + Math.floor((ms % 60000) / 1000) + 's';
  return Math.floor(ms / 3600000) + 'h' + Math.floor((ms % 3600000) / 60000) + 'm';
}

// A labelled value: <span class="field">label <span class="cls"></span></span>.
function field(parent, label, cls) {
  const box = el('span', 'field', label + ' ');
  const value = el('span', cls);
  box.append(value);
  parent.append(box);
  return value;
}

// The elements of one node, made once and updated on every poll, so that nothing the
// operator points at (a button, the focus) is replaced under them.
function makeRow(node) {
  const r = { li: el('li'), row: el('div', 'node'), kids: el('ul') };
  r.row.dataset.path = node.path;
  const head = el('div', 'head');
  head.append(r.name = el('span', 'name', node.id), r.kind = el('span', 'kind'),
    r.state = el('span', 'state'), r.ready = el('span', 'ready'));
  r.generation = field(head, 'gen', 'generation');
  r.restarts = field(head, 'restarts', 'restarts');
  head.append(r.window = el('span', 'window'));
  r.uptime = field(head, 'up', 'uptime');
  r.countdown = field(head, 'next start in', 'countdown');
  if (node.path.includes('/')) { // the root cannot be controlled
    const actions = el('span', 'actions');
    for (const action of ACTIONS) {
      const b = el('button', 'action', action);
      b.type = 'button';
      b.dataset.action = action;
      b.setAttribute('aria-label', action + ' ' + node.path);
      actions.append(b);
    }
    head.append(actions);
  }
  r.warning = el('div', 'warning');
  r.failure = el('div', 'last-failure');
  r.inbox = el('div', 'inbox');
  r.pools = el('div', 'pools');
  r.row.append(head, r.warning, r.failure, r.inbox, r.pools);
  r.li.append(r.row, r.kids);
  rows.set(node.path, r);
  return r;
}

function update(r, n) {
  setText(r.kind, [n.kind !== 'supervisor' ? n.kind : '', n.strategy || ''].filter(Boolean).join(' · '));
  setText(r.state, n.state);
  r.state.className = 'state state-' + n.state;
  setText(r.ready, n.ready ? 'ready' : 'not ready');
  r.ready.className = 'ready ' + (n.ready ? 'ready-yes' : 'ready-no');
  setText(r.generation, String(n.generation));
  setText(r.restarts, String(n.restarts_total));
  show(r.window, n.restarts_in_window || n.consecutive_failures
    ? '(' + n.restarts_in_window + ' in window, ' + n.consecutive_failures + ' in a row)' : '');
  const now = performance.now();
  r.upSince = n.uptime_ms != null ? now - n.uptime_ms : null;
  r.nextAt = n.next_restart_in_ms != null ? now + n.next_restart_in_ms : null;
  tickRow(r, now);
  const parked = n.state === 'parked' ? 'parked: stays down until an operator starts it' : '';
  show(r.warning, [parked, n.warning ? 'warning: ' + n.warning : ''].filter(Boolean).join('; '));
  const f = n.last_failure;
  show(r.failure, f ? 'last failure: ' + f.class + ': ' + f.reason + (f.at ? ' (at ' + f.at + ')' : '') : '');
  const i = n.inbox;
  show(r.inbox, i ? 'inbox: ' + i.messages + ' stored, ' + i.undelivered + ' undelivered' +
    (i.oldest_undelivered_age_ms != null ? ', oldest undelivered ' + human(i.oldest_undelivered_age_ms) + ' ago' : '') : '');
  drawPools(r.pools, n.pools || []);
}

// Start-slot pools: small, redrawn whole (they hold no buttons).
function drawPools(box, pools) {
  box.hidden = pools.length === 0;
  box.replaceChildren(...pools.map((p) => {
    const div = el('div', 'pool');
    div.dataset.pool = p.name;
    const holders = p.holders.map((h) => h.holder + ' (' + human(h.held_ms) + ')').join(', ');
    const queue = p.queue.join(', ') + (p.queue_len > p.queue.length ? ', …' : '');
    div.append(el('span', 'pool-name', 'pool ' + p.name + ': '),
      el('span', 'pool-held', p.holders.length + '/' + p.max_concurrent + ' held'),
      el('span', 'pool-holders', holders ? ' by ' + holders : ''),
      el('span', 'pool-queue', ', ' + p.queue_len + ' queued' + (queue ? ': ' + queue : '')));
    return div;
  }));
}

// Places `nodes` in order in `ul`, reusing each path's elements; returns nothing.
function place(ul, nodes, seen) {
  nodes.forEach((n, i) => {
    seen.add(n.path);
    const r = rows.get(n.path) || makeRow(n);
    if (ul.children[i] !== r.li) ul.insertBefore(r.li, ul.children[i] || null);
    update(r, n);
    place(r.kids, n.children || [], seen);
  });
}

function render(tree) {
  const seen = new Set();
  place($('tree'), [tree], seen);
  for (const [path, r] of rows) {
    if (!seen.has(path)) { r.li.remove(); rows.delete(path); }
  }
}

function clearTree() {
  $('tree').replaceChildren();
  rows.clear();
}

// Uptime and the backoff countdown move between polls.
function tickRow(r, now) {
  show(r.uptime, r.upSince != null ? human(now - r.upSince) : '');
  show(r.countdown, r.nextAt != null ? human(r.nextAt - now) : '');
}

setInterval(() => {
  if (document.body.classList.contains('stale')) return; // nothing new to count from
  const now = performance.now();
  for (const r of rows.values()) tickRow(r, now);
}, TICK_MS);

// ---- actions ----------------------------------------------------------------------

$('tree').addEventListener('click', (e) => {
  const b = e.target.closest('button.action');
  if (!b) return;
  const path = b.closest('.node').dataset.path;
  pending = { path, action: b.dataset.action, button: b };
  $('confirm-text').textContent = b.dataset.action + ' ' + path + '? ' + WHAT[b.dataset.action];
  $('confirm').showModal();
  $('confirm-no').focus();
});

$('confirm-no').addEventListener('click', () => $('confirm').close());

$('confirm-yes').addEventListener('click', () => {
  const p = pending;
  $('confirm').close();
  if (p) act(p.path, p.action);
});

// Closed by a button or Escape: forget the action, give the focus back to its button.
$('confirm').addEventListener('close', () => {
  const p = pending;
  pending = null;
  if (p && p.button.isConnected) p.button.focus();
});

async function act(path, action) {
  const what = action + ' ' + path;
  status(what + ': sending…', '');
  const url = '/admin/actors/' + path.split('/').map(encodeURIComponent).join('/') + '/' + action;
  try {
    const r = await request('POST', url);
    if (r.ok) {
      status(what + ': done', 'status-ok');
    } else {
      status(what + ' failed: ' + errorText(r), 'status-error');
      if (r.status === 401) needToken(errorText(r));
    }
  } catch (e) {
    status(what + ' failed: warden unreachable (' + e.message + ')', 'status-error');
  }
  if (!paused) poll();
}

function status(text, cls) {
  const line = $('status-line');
  line.textContent = text;
  line.className = cls;
}

poll();
