// provisiond's web console: plain JavaScript, no build step, nothing from the network.
//
// Every piece of data comes from the admin API (/v1/...) and /metrics of the sidecar
// that serves this page; the console can do nothing the API does not allow. Data is
// always put in the page as text (textContent), never as HTML: event names, replies and
// errors come from the billing and the handlers.
'use strict';

const TOKEN_KEY = 'provisiond.token';
const REFRESH_MS = 3000;

const OUTCOMES = {
  allowed: { symbol: '✓', tone: 'ok', title: 'before stage: the handler allowed the event' },
  delivered: { symbol: '✓', tone: 'ok', title: 'after stage: the handler accepted the delivery' },
  denied: { symbol: '⊘', tone: 'warn', title: 'before stage: the handler forbade the action' },
  failed: { symbol: '↻', tone: 'warn', title: 'after stage: the attempt failed and will be retried' },
  error: { symbol: '✕', tone: 'bad', title: 'the call could not be made or judged (a filter failed, a bad reply): before stage, on_error decided; after stage, retried as a failure' },
  dead: { symbol: '☠', tone: 'dead', title: 'after stage: the delivery went to the dead letters' },
};

const state = {
  timer: null,
  renderId: 0,
  config: null,
  expanded: new Set(),
  selected: new Set(),
  live: true,
  explain: { event: 'clients.create', object_id: '1', data: '{\n  \n}' },
  tokenWaiters: [],
  notices: 0,
  refreshFailed: null,
};

// ---------------------------------------------------------------------------- DOM

/** An element: h('td', {class: 'x', onclick: f}, 'text', child, [more]). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(key, '');
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

function $(id) {
  return document.getElementById(id);
}

function pad(n, width = 2) {
  return String(n).padStart(width, '0');
}

/** A time in local time, with the UTC on hover. */
function time(iso, withMs = false) {
  if (!iso) return h('span', { class: 'muted' }, '—');
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return h('span', {}, iso);
  let text = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  if (withMs) text += `.${pad(d.getMilliseconds(), 3)}`;
  return h('time', { datetime: d.toISOString(), title: `${d.toISOString()} (UTC)` }, text);
}

function age(seconds) {
  if (!Number.isFinite(seconds) || seconds <= 0) return '—';
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} days`;
}

function outcome(name) {
  const o = OUTCOMES[name] || { symbol: '?', tone: 'neutral', title: name };
  return h('span', { class: `badge ${o.tone}`, title: o.title, dataset: { outcome: name } },
    h('span', { class: 'sym', 'aria-hidden': 'true' }, o.symbol), ` ${name}`);
}

function stageTag(stage) {
  return h('span', { class: `stage ${stage}` }, stage);
}

function emptyState(title, ...lines) {
  return h('div', { class: 'empty' }, h('p', { class: 'empty-title' }, title),
    lines.map((l) => h('p', {}, l)));
}

function code(text) {
  return h('code', {}, text);
}

/** Shows `text` in the notice bar, in place of what it showed; its number. */
function notice(text, tone = 'ok') {
  $('notice-text').textContent = text;
  $('notice').className = `notice ${tone}`;
  $('notice').hidden = false;
  return ++state.notices;
}

function hashRoute() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [page, query] = raw.split('?');
  return { page: page || 'overview', params: new URLSearchParams(query || '') };
}

/** Shows a page: a new address renders through `hashchange`, the same one at once. */
function go(page, params) {
  const query = params && params.toString();
  const hash = `#/${page}${query ? `?${query}` : ''}`;
  if (location.hash === hash) route();
  else location.hash = hash;
}

// ---------------------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** A call to the sidecar, with the token when the operator gave one. A 401 asks for
 *  the token and, once one is given, tries again. */
async function api(path, options = {}) {
  for (;;) {
    const headers = Object.assign({}, options.headers);
    const token = sessionStorage.getItem(TOKEN_KEY);
    // The token is for the admin API; `/metrics` takes none and gets none.
    if (token && path.startsWith('/v1/')) headers.Authorization = `Bearer ${token}`;
    let response;
    try {
      response = await fetch(path, Object.assign({}, options, { headers, cache: 'no-store' }));
    } catch (e) {
      throw new ApiError(0, `provisiond did not answer (${e.message}); is it still running?`);
    }
    const text = await response.text();
    let body = text;
    try {
      body = JSON.parse(text);
    } catch (_) {
      // Not JSON: /metrics, or a proxy's page.
    }
    if (response.status === 401) {
      await askToken(token);
      continue;
    }
    if (!response.ok) {
      const message = body && body.error && body.error.message;
      throw new ApiError(response.status, `${message || text || response.statusText} (HTTP ${response.status})`);
    }
    return body;
  }
}

/** Opens the token dialog (once, however many calls wait) and resolves when a token is
 *  entered. `rejected` is the token the sidecar just refused, if any. */
function askToken(rejected) {
  const dialog = $('token-dialog');
  const message = $('token-message');
  if (rejected) {
    message.textContent = 'The token was not accepted: provisiond answered 401 (missing or wrong ' +
      'token). Check server.token in provisioning.toml (or the variable it names) and enter it again.';
    message.className = 'token-message bad';
    sessionStorage.removeItem(TOKEN_KEY);
  } else if (!dialog.open) {
    message.textContent = 'This provisiond has server.token set: its /v1 API needs the token.';
    message.className = 'token-message';
  }
  updateSession();
  if (!dialog.open) {
    const main = $('main');
    if (!main.querySelector('h1')) main.replaceChildren(h('p', { class: 'muted' }, 'Waiting for the token…'));
    $('token-input').value = '';
    dialog.showModal();
    $('token-input').focus();
  }
  return new Promise((resolve) => state.tokenWaiters.push(resolve));
}

function tokenEntered(event) {
  event.preventDefault();
  const value = $('token-input').value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  $('token-dialog').close();
  updateSession();
  const waiters = state.tokenWaiters;
  state.tokenWaiters = [];
  waiters.forEach((resolve) => resolve());
}

function updateSession() {
  const has = Boolean(sessionStorage.getItem(TOKEN_KEY));
  $('session-state').textContent = has ? 'token set for this tab' : '';
  $('token-forget').hidden = !has;
}

/** Prometheus text format -> [{name, labels, value}]. */
function parseMetrics(text) {
  const samples = [];
  for (const line of String(text).split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    let l;
    while (m[2] && (l = re.exec(m[2]))) {
      labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === 'n' ? '\n' : c));
    }
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

function metric(samples, name) {
  return samples.filter((s) => s.name === name);
}

// ---------------------------------------------------------------------------- pages

const PAGES = { overview, executions, deadletters, explain };

async function route() {
  clearTimeout(state.timer);
  const { page, params } = hashRoute();
  const render = PAGES[page] || overview;
  for (const a of document.querySelectorAll('#nav a')) {
    a.classList.toggle('active', a.dataset.page === page);
    if (a.dataset.page === page) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const id = ++state.renderId;
  const main = $('main');
  try {
    await render(main, params, id);
  } catch (e) {
    if (id !== state.renderId) return;
    main.replaceChildren(h('div', { class: 'alert bad', id: 'load-error' },
      h('strong', {}, 'Could not load this page. '), e.message, ` · trying again every ${REFRESH_MS / 1000} s`));
    // The sidecar may be restarting: load the page again as a refresh would.
    again(id, route);
  }
}

/** Runs `refresh` again in a while, unless the operator went elsewhere meanwhile. */
function again(id, refresh) {
  clearTimeout(state.timer);
  state.timer = setTimeout(async () => {
    if (id !== state.renderId || document.querySelector('dialog[open]')) {
      if (id === state.renderId) again(id, refresh);
      return;
    }
    try {
      await refresh();
      // Refreshes work again: the failure goes, if no other notice took its place.
      if (state.refreshFailed === state.notices) $('notice').hidden = true;
    } catch (e) {
      state.refreshFailed = notice(`Refresh failed: ${e.message}`, 'bad');
    }
    if (id === state.renderId) again(id, refresh);
  }, REFRESH_MS);
}

async function loadConfig() {
  state.config = await api('/v1/config');
  return state.config;
}

// Overview ---------------------------------------------------------------------

async function overview(main, _params, id) {
  const draw = async () => {
    const [config, text] = await Promise.all([loadConfig(), api('/metrics')]);
    if (id !== state.renderId) return;
    main.replaceChildren(...overviewView(config, parseMetrics(text)));
  };
  await draw();
  again(id, draw);
}

function overviewView(config, samples) {
  const out = [h('h1', {}, 'Overview')];
  const err = config.last_error;
  if (err) {
    out.push(h('section', { class: 'alert bad big', id: 'reload-error' },
      h('h2', {}, '✕ The last reload was rejected: the config below is still the live one'),
      h('p', {}, 'At ', time(err.at), `, triggered by ${err.trigger}. Fix the file and save it again; `,
        'the error clears once a good file loads.'),
      h('ul', { class: 'errors' }, (err.errors || []).map((e) => h('li', {}, h('pre', {}, e))))));
  }
  if (config.restart_needed && config.restart_needed.length) {
    out.push(h('section', { class: 'alert warn', id: 'restart-needed' },
      h('h2', {}, '⚠ Settings waiting for a restart'),
      h('p', {}, 'The file changes these, but they are read once at start; the running values stay until provisiond restarts.'),
      table(['setting', 'in the file', 'running'], config.restart_needed.map((p) =>
        h('tr', {}, h('td', {}, code(p.setting)), h('td', {}, code(JSON.stringify(p.file))),
          h('td', {}, code(JSON.stringify(p.running))))))));
  }

  const depth = metric(samples, 'provisiond_after_queue_depth');
  const oldestBy = metric(samples, 'provisiond_after_handler_oldest_age_seconds');
  const queued = depth.reduce((n, s) => n + s.value, 0);
  const oldest = metric(samples, 'provisiond_after_queue_oldest_age_seconds')[0];
  const dead = metric(samples, 'provisiond_dead_letters')[0];
  const enabled = config.handlers.filter((x) => x.enabled).length;
  updateDeadCount(dead ? dead.value : null);

  out.push(h('div', { class: 'cards' },
    card('Generation', String(config.generation), `reloads: ${config.reloads.applied} applied, ` +
      `${config.reloads.unchanged} unchanged, ${config.reloads.rejected} rejected`),
    card('Loaded at', time(config.loaded_at)),
    card('Handlers', `${enabled}`, `enabled, of ${config.handlers.length} in the file`),
    card('Queued deliveries', String(queued), oldest && oldest.value > 0 ? `oldest waiting ${age(oldest.value)}` : 'nothing waiting'),
    card('Dead letters', dead ? String(dead.value) : '?', dead && dead.value > 0
      ? h('a', { href: '#/deadletters' }, 'see them') : 'none', dead && dead.value > 0 ? 'bad' : null)));

  out.push(h('p', { class: 'file' }, 'File ', code(config.file), ' · sha256 ',
    h('code', { title: config.hash, class: 'hash' }, config.hash)));

  out.push(h('h2', {}, 'Handlers'));
  if (!config.handlers.length) {
    out.push(emptyState('No handlers are loaded.',
      'Add [[handler]] tables to provisioning.toml and save it: provisiond reloads it by itself (or run provisiond check first).'));
  } else {
    out.push(table(['#', 'name', 'stage', 'priority', 'events', 'target', 'settings', 'queued'],
      config.handlers.map((x, i) => {
        const q = depth.find((s) => s.labels.handler === x.name);
        const o = oldestBy.find((s) => s.labels.handler === x.name);
        const waiting = q && q.value > 0 && o && o.value > 0 ? ` · oldest ${age(o.value)}` : '';
        return h('tr', { dataset: { handler: x.name }, class: x.enabled ? null : 'disabled' },
          h('td', { class: 'num muted' }, i + 1),
          h('td', { class: 'name' }, h('strong', {}, x.name), x.enabled ? null : h('span', { class: 'badge neutral' }, '○ disabled')),
          h('td', {}, stageTag(x.stage)),
          h('td', { class: 'num' }, x.priority),
          h('td', {}, x.events.map((e) => h('code', { class: 'chip' }, e))),
          h('td', { class: 'target' }, code(x.target)),
          h('td', { class: 'small' }, settings(x)),
          h('td', { class: 'num' }, x.stage === 'after' ? String(q ? q.value : 0) + waiting : h('span', { class: 'muted' }, '—')));
      }), 'handlers-table'));
    if (oldest) {
      out.push(h('p', { class: 'muted small' }, 'Queued: after-stage deliveries waiting (provisiond_after_queue_depth), with the age of the oldest one being worked on. ' +
        `The oldest waiting delivery, over all handlers, is ${oldest.value > 0 ? age(oldest.value) + ' old' : 'none'}.`));
    }
  }

  out.push(h('h2', {}, 'Dispatch order'));
  const routed = Object.entries(config.events).filter(([, r]) => r.before.length || r.after.length);
  const idle = Object.keys(config.events).length - routed.length;
  if (!routed.length) {
    out.push(emptyState('No event goes to any handler.', 'Give a handler events = ["clients.create"] (or "clients.*", or "*").'));
  } else {
    out.push(table(['event', 'before stage, in order', 'after stage'], routed.map(([name, r]) =>
      h('tr', {}, h('td', {}, code(name)), h('td', {}, chain(r.before)), h('td', {}, chain(r.after)))), 'dispatch-table'));
    if (idle) out.push(h('p', { class: 'muted small' }, `${idle} other known event${idle === 1 ? '' : 's'} go to no handler.`));
  }
  return out;
}

function card(label, value, sub, tone) {
  return h('div', { class: `card ${tone || ''}` }, h('div', { class: 'card-label' }, label),
    h('div', { class: 'card-value' }, value), sub ? h('div', { class: 'card-sub' }, sub) : null);
}

function chain(names) {
  if (!names.length) return h('span', { class: 'muted' }, '—');
  return names.map((n, i) => [i ? h('span', { class: 'arrow' }, ' → ') : null, h('span', { class: 'chain' }, n)]);
}

function settings(x) {
  const parts = [`timeout ${x.timeout}`, `max_concurrency ${x.max_concurrency}`];
  if (x.stage === 'before') {
    parts.unshift(`on_error ${x.on_error}`);
    if (x.modifies) parts.unshift('modifies');
  } else if (x.retry) {
    parts.unshift(`retry ${x.retry.attempts}× from ${x.retry.backoff} to ${x.retry.max_backoff}`);
  }
  return parts.join(' · ');
}

function table(headers, rows, id) {
  return h('div', { class: 'table-wrap' }, h('table', { id },
    h('thead', {}, h('tr', {}, headers.map((x) => h('th', {}, x)))),
    h('tbody', {}, rows)));
}

function updateDeadCount(n) {
  const badge = $('nav-dead');
  badge.hidden = !n;
  badge.textContent = n ? String(n) : '';
}

/** A time typed without a zone ("2026-12-07 17:00") is read as this browser's local
 * time, the zone the tables show times in, and sent with its offset; anything else
 * (a duration, a time with a zone, a typo for the API to name) goes as typed. */
function zoned(text) {
  if (!/^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?$/.test(text)) return text;
  const at = new Date(text.replace(' ', 'T'));
  if (Number.isNaN(at.getTime())) return text;
  return at.toISOString();
}

// Executions ---------------------------------------------------------------------

const EXECUTION_FILTERS = ['event', 'handler', 'object_id', 'outcome', 'event_id', 'since', 'limit'];

async function executions(main, params, id) {
  const config = state.config || (await loadConfig());
  const filters = {};
  for (const key of EXECUTION_FILTERS) if (params.get(key)) filters[key] = params.get(key);
  const form = executionForm(config, filters);
  const status = h('p', { class: 'muted small', id: 'executions-status' });
  const holder = h('div', { id: 'executions' });
  main.replaceChildren(h('h1', {}, 'Executions'), form, status, holder);

  const draw = async () => {
    const query = new URLSearchParams(filters).toString();
    let body;
    try {
      body = await api(`/v1/executions${query ? `?${query}` : ''}`);
    } catch (e) {
      if (e.status !== 400 || id !== state.renderId) throw e;
      // A filter the API refuses: keep the form, say what to fix.
      holder.replaceChildren(h('div', { class: 'alert bad', id: 'filter-error' },
        h('strong', {}, 'The filters were refused: '), e.message, '. Fix them above and apply again.'));
      status.replaceChildren();
      return;
    }
    if (id !== state.renderId) return;
    // Newest first by the time a call started: the log numbers before-stage rows when
    // their batch is written, which can be after the after-stage rows of the same event.
    const rows = body.executions.slice().sort((a, b) => Date.parse(b.time) - Date.parse(a.time) || b.id - a.id);
    holder.replaceChildren(executionTable(rows, filters));
    status.replaceChildren(`${body.count} row${body.count === 1 ? '' : 's'}, newest first`,
      state.live ? ` · refreshing every ${REFRESH_MS / 1000} s` : ' · live refresh paused',
      ' · updated ', time(new Date().toISOString()));
  };
  await draw();
  if (state.live) again(id, draw);
}

function executionForm(config, filters) {
  const field = (name, label, input) => h('label', { class: 'field' }, h('span', {}, label), input);
  const events = h('datalist', { id: 'known-events' }, Object.keys(config.events).map((e) => h('option', { value: e })));
  const form = h('form', { class: 'filters', id: 'executions-filters', onsubmit: (e) => {
    e.preventDefault();
    const params = new URLSearchParams();
    for (const key of EXECUTION_FILTERS) {
      const value = form.elements[key].value.trim();
      if (value) params.set(key, key === 'since' ? zoned(value) : value);
    }
    go('executions', params);
  } },
  events,
  field('event', 'Event', h('input', { name: 'event', list: 'known-events', value: filters.event || '', placeholder: 'any' })),
  field('handler', 'Handler', h('select', { name: 'handler' }, h('option', { value: '' }, 'any'),
    config.handlers.map((x) => h('option', { value: x.name, selected: filters.handler === x.name }, x.name)),
    filters.handler && !config.handlers.some((x) => x.name === filters.handler)
      ? h('option', { value: filters.handler, selected: true }, filters.handler) : null)),
  field('object_id', 'Object id', h('input', { name: 'object_id', value: filters.object_id || '', placeholder: 'any', size: 8, inputmode: 'numeric' })),
  field('outcome', 'Outcome', h('select', { name: 'outcome' }, h('option', { value: '' }, 'any'),
    Object.keys(OUTCOMES).map((o) => h('option', { value: o, selected: filters.outcome === o }, `${OUTCOMES[o].symbol} ${o}`)))),
  field('event_id', 'Event id', h('input', { name: 'event_id', value: filters.event_id || '', placeholder: 'any', size: 12 })),
  field('since', 'Since', h('input', { name: 'since', value: filters.since || '', placeholder: '15m, 2h or a time', size: 12,
    title: 'A duration back from now, or a time; a time without a zone is this browser\'s local time, as the tables show them' })),
  field('limit', 'Limit', h('input', { name: 'limit', value: filters.limit || '', placeholder: '100', size: 5, inputmode: 'numeric' })),
  h('div', { class: 'filter-buttons' },
    h('button', { type: 'submit', class: 'primary', id: 'executions-apply' }, 'Apply'),
    h('button', { type: 'button', onclick: () => go('executions') }, 'Clear'),
    h('label', { class: 'live' }, h('input', { type: 'checkbox', id: 'live', checked: state.live, onchange: (e) => {
      state.live = e.target.checked;
      route();
    } }), ' Live')));
  return form;
}

function executionTable(rows, filters) {
  if (!rows.length) {
    if (Object.keys(filters).length) {
      return emptyState('No executions match these filters.',
        'Widen them: clear “since”, pick “any” outcome, or ', h('a', { href: '#/executions' }, 'clear all filters'), '.');
    }
    return emptyState('Nothing has been recorded yet.',
      ['Handler calls show here about a second after they happen. Send a test event: ',
        code('provisiond send clients.create --object-id 1'), '.']);
  }
  const body = [];
  for (const r of rows) {
    const open = state.expanded.has(r.id);
    const row = h('tr', { class: `row${open ? ' open' : ''}`, dataset: { execution: r.id }, tabindex: 0,
      title: 'Show the reply and the error', onclick: () => toggle(r.id), onkeydown: (e) => {
        if (e.key === 'Enter') toggle(r.id);
      } },
    h('td', { class: 'nowrap' }, time(r.time, true)),
    h('td', {}, code(r.event)),
    h('td', { class: 'num' }, r.object_id ? h('a', { href: `#/executions?object_id=${encodeURIComponent(r.object_id)}`,
      class: 'object-link', title: `Every execution for object ${r.object_id}`, onclick: (e) => e.stopPropagation() }, r.object_id) : '—'),
    h('td', {}, r.handler),
    h('td', {}, stageTag(r.stage)),
    h('td', { class: 'num' }, r.attempt),
    h('td', {}, outcome(r.outcome)),
    h('td', { class: 'num nowrap' }, `${Number(r.duration_ms).toFixed(1)} ms`),
    h('td', { class: 'num' }, r.code === null || r.code === undefined ? '—' : String(r.code)));
    body.push(row);
    if (open) {
      body.push(h('tr', { class: 'detail', dataset: { detail: r.id } }, h('td', { colspan: 9 },
        h('dl', {},
          h('dt', {}, 'Reply excerpt'), h('dd', {}, r.excerpt ? h('pre', { class: 'excerpt' }, r.excerpt) : h('span', { class: 'muted' }, '(empty)')),
          h('dt', {}, 'Error'), h('dd', {}, r.error ? h('pre', { class: 'error-text' }, r.error) : h('span', { class: 'muted' }, 'none')),
          h('dt', {}, 'Ids'), h('dd', {}, `execution ${r.id}`, r.delivery ? ` · delivery ${r.delivery}` : ''),
          h('dt', {}, 'Time (UTC)'), h('dd', {}, r.time)))));
    }
  }
  return table(['time', 'event', 'object id', 'handler', 'stage', 'attempt', 'outcome', 'duration', 'status / exit'], body, 'executions-table');

  function toggle(rowId) {
    if (state.expanded.has(rowId)) state.expanded.delete(rowId);
    else state.expanded.add(rowId);
    $('executions-table').closest('.table-wrap').replaceWith(executionTable(rows, filters));
  }
}

// Dead letters ---------------------------------------------------------------------

/** The most dead letters the page lists at once (the API's own largest page). */
const DEAD_PAGE = 1000;

async function deadletters(main, params, id) {
  const config = state.config || (await loadConfig());
  const handler = params.get('handler') || '';
  const toolbar = h('div', { class: 'toolbar' });
  const holder = h('div', { id: 'deadletters' });
  const form = h('form', { class: 'inline-form', onsubmit: (e) => {
    e.preventDefault();
    const p = new URLSearchParams();
    if (form.elements.handler.value) p.set('handler', form.elements.handler.value);
    go('deadletters', p);
  } },
  h('label', { class: 'field' }, h('span', {}, 'Handler'), h('select', { name: 'handler', onchange: () => form.requestSubmit() })));
  // The after-stage handlers of the config, the one asked for, and those whose letters
  // are listed: a handler a reload removed keeps its dead letters.
  const names = new Set(config.handlers.filter((x) => x.stage === 'after').map((x) => x.name));
  if (handler) names.add(handler);
  const options = () => form.elements.handler.replaceChildren(h('option', { value: '' }, 'any'),
    ...[...names].sort().map((n) => h('option', { value: n, selected: n === handler }, n)));
  options();
  main.replaceChildren(h('h1', {}, 'Dead letters'),
    h('p', { class: 'muted' }, 'Deliveries whose retries ran out, that got 410 Gone, or whose handler a reload removed. ' +
      'Replay puts one back in its queue (behind what its entity queued since, attempts from 1); drop deletes it.'),
    h('div', { class: 'filters' }, form, toolbar), holder);

  let letters = [];
  let more = false;
  const draw = async () => {
    const query = handler ? `?handler=${encodeURIComponent(handler)}&limit=${DEAD_PAGE}` : `?limit=${DEAD_PAGE}`;
    const body = await api(`/v1/deadletters${query}`);
    if (id !== state.renderId) return;
    letters = body.deadletters;
    more = Boolean(body.more);
    const ids = new Set(letters.map((l) => l.id));
    for (const s of [...state.selected]) if (!ids.has(s)) state.selected.delete(s);
    if (!handler && !more) updateDeadCount(letters.length);
    if (more) {
      // The page holds only the oldest; the store's count is in the metrics.
      const dead = metric(parseMetrics(await api('/metrics')), 'provisiond_dead_letters')[0];
      if (id !== state.renderId) return;
      if (dead) updateDeadCount(dead.value);
    }
    const known = names.size;
    for (const l of letters) names.add(l.handler);
    if (names.size !== known) options();
    paint();
  };
  const paint = () => {
    holder.replaceChildren(deadLetterTable(letters, paint));
    const n = state.selected.size;
    toolbar.replaceChildren(
      h('span', { class: 'muted', id: 'deadletters-count' }, more
        ? `the oldest ${letters.length} dead letters, and more (the list stops at ${DEAD_PAGE}; replay or drop these, or use the CLI's --after to page)`
        : `${letters.length} dead letter${letters.length === 1 ? '' : 's'}`, n ? ` · ${n} selected` : ''),
      h('button', { type: 'button', id: 'replay-selected', disabled: !n, onclick: () => act('replay', [...state.selected], letters) },
        `↻ Replay selected (${n})`),
      h('button', { type: 'button', id: 'drop-selected', class: 'danger', disabled: !n, onclick: () => act('drop', [...state.selected], letters) },
        `✕ Drop selected (${n})`),
      h('span', { class: 'sep', 'aria-hidden': 'true' }, '·'),
      h('button', { type: 'button', id: 'replay-matching', disabled: !letters.length, onclick: () => actMatching('replay', handler, letters, more) },
        handler ? `↻ Replay all of ${handler}` : '↻ Replay all'),
      h('button', { type: 'button', id: 'drop-matching', class: 'danger', disabled: !letters.length, onclick: () => actMatching('drop', handler, letters, more) },
        handler ? `✕ Drop all of ${handler}` : '✕ Drop all'));
  };
  await draw();
  again(id, draw);
}

function deadLetterTable(letters, paint) {
  if (!letters.length) {
    return emptyState('No dead letters.',
      'A delivery lands here when its handler answers 410 Gone, when its retries run out, or when a reload removes its handler. Nothing needs doing.');
  }
  const all = letters.every((l) => state.selected.has(l.id));
  const selectAll = h('input', { type: 'checkbox', id: 'select-all', title: 'Select all', 'aria-label': 'Select all', checked: all, onchange: (e) => {
    for (const l of letters) {
      if (e.target.checked) state.selected.add(l.id);
      else state.selected.delete(l.id);
    }
    paint();
  } });
  const rows = [];
  for (const l of letters) {
    const open = state.expanded.has(`d${l.id}`);
    rows.push(h('tr', { class: `row${open ? ' open' : ''}`, dataset: { deadletter: l.id }, onclick: () => {
      const key = `d${l.id}`;
      if (state.expanded.has(key)) state.expanded.delete(key);
      else state.expanded.add(key);
      paint();
    } },
    h('td', { onclick: (e) => e.stopPropagation() }, h('input', { type: 'checkbox', class: 'select', 'aria-label': `Select dead letter ${l.id}`,
      checked: state.selected.has(l.id), onchange: (e) => {
        if (e.target.checked) state.selected.add(l.id);
        else state.selected.delete(l.id);
        paint();
      } })),
    h('td', { class: 'num' }, l.id),
    h('td', { class: 'nowrap' }, time(l.died_at)),
    h('td', {}, l.handler),
    h('td', {}, code(l.event)),
    h('td', { class: 'num' }, l.object_id ? h('a', { href: `#/executions?object_id=${encodeURIComponent(l.object_id)}`,
      title: `Every execution for object ${l.object_id}`, onclick: (e) => e.stopPropagation() }, l.object_id) : '—'),
    h('td', { class: 'num' }, l.attempts),
    h('td', { class: 'reason' }, h('span', { class: 'badge dead' }, h('span', { class: 'sym', 'aria-hidden': 'true' }, '☠'), ' '), l.reason),
    h('td', { class: 'nowrap', onclick: (e) => e.stopPropagation() },
      h('button', { type: 'button', class: 'small', dataset: { action: 'replay', id: l.id }, onclick: () => act('replay', [l.id], letters) }, '↻ Replay'),
      ' ',
      h('button', { type: 'button', class: 'small danger', dataset: { action: 'drop', id: l.id }, onclick: () => act('drop', [l.id], letters) }, '✕ Drop'))));
    if (open) {
      rows.push(h('tr', { class: 'detail' }, h('td', { colspan: 9 }, h('dl', {},
        h('dt', {}, 'Entity'), h('dd', {}, code(l.entity)),
        h('dt', {}, 'Last error'), h('dd', {}, l.last_error ? h('pre', { class: 'error-text' }, l.last_error) : h('span', { class: 'muted' }, 'none')),
        h('dt', {}, 'Queued at'), h('dd', {}, time(l.enqueued_at), ' · died at ', time(l.died_at), ' · message id ', code(l.message_id)),
        h('dt', {}, 'Stored envelope'), h('dd', {}, h('pre', { class: 'envelope' }, JSON.stringify(l.envelope, null, 2)))))));
    }
  }
  return table([selectAll, 'id', 'died at', 'handler', 'event', 'object id', 'attempts', 'reason', ''], rows, 'deadletters-table');
}

/** Replays or drops dead letters, after a confirmation; one API call per id. */
async function act(action, selected, letters) {
  if (!selected.length) return;
  // In id order, the order their events arrived (not the order they were ticked): one
  // entity's replays then go out in their original order.
  const ids = [...selected].sort((a, b) => a - b);
  const byId = new Map(letters.map((l) => [l.id, l]));
  const n = ids.length;
  const what = `${n} dead letter${n === 1 ? '' : 's'}`;
  const ok = await confirmDialog(
    action === 'replay' ? `Replay ${what}?` : `Drop ${what}?`,
    action === 'replay'
      ? 'Each goes back to its handler\'s queue, behind what its entity queued since, and is attempted from 1 with the same webhook-id.'
      : 'Each is deleted from the store for good; the billing is not told. This cannot be undone.',
    ids.map((i) => {
      const l = byId.get(i);
      return l ? `#${l.id} · ${l.handler} · ${l.event} · object ${l.object_id}` : `#${i}`;
    }),
    action === 'replay' ? `↻ Replay ${what}` : `✕ Drop ${what}`);
  if (!ok) return;
  const done = [];
  const failed = [];
  for (const i of ids) {
    try {
      const body = action === 'replay'
        ? await api(`/v1/deadletters/${i}/replay`, { method: 'POST' })
        : await api(`/v1/deadletters/${i}`, { method: 'DELETE' });
      done.push(action === 'replay' ? `#${i} → delivery ${body.delivery}` : `#${i}`);
      state.selected.delete(i);
    } catch (e) {
      failed.push(`#${i}: ${e.message}`);
    }
  }
  const verb = action === 'replay' ? 'Replayed' : 'Dropped';
  let text = done.length ? `${verb} ${done.length}: ${done.join(', ')}.` : '';
  if (failed.length) text += `${text ? ' ' : ''}Not ${verb.toLowerCase()}: ${failed.join('; ')}`;
  notice(text, failed.length ? 'bad' : 'ok');
  await route();
}

/** Replays or drops every dead letter the filter matches (the handler chosen, or all),
 * after a confirmation, in one call of the bulk API: per-entity order is kept. */
async function actMatching(action, handler, letters, more) {
  const scope = handler ? `every dead letter of ${handler}` : 'every dead letter';
  const ok = await confirmDialog(
    action === 'replay' ? `Replay ${scope}?` : `Drop ${scope}?`,
    (action === 'replay'
      ? 'They go back to their handlers\' queues in their order, each attempted from 1 with the same webhook-id.'
      : 'They are deleted from the store for good; the billing is not told. This cannot be undone.') +
      (more
        ? ` The ${letters.length} listed are the oldest: more match, and all of them are ${action === 'replay' ? 'replayed' : 'dropped'}.`
        : ` ${letters.length} ${letters.length === 1 ? 'is' : 'are'} listed; any that died since also match.`),
    letters.map((l) => `#${l.id} · ${l.handler} · ${l.event} · object ${l.object_id}`),
    action === 'replay' ? `↻ Replay ${scope}` : `✕ Drop ${scope}`);
  if (!ok) return;
  const filter = handler ? { handler } : { all: true };
  try {
    const body = await api(`/v1/deadletters/${action}`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(filter),
    });
    let text = action === 'replay' ? `Replayed ${body.replayed}.` : `Dropped ${body.dropped}.`;
    if (body.message) text += ` ${body.message}`;
    state.selected.clear();
    notice(text, body.skipped ? 'bad' : 'ok');
  } catch (e) {
    notice(`Not ${action === 'replay' ? 'replayed' : 'dropped'}: ${e.message}`, 'bad');
  }
  await route();
}

function confirmDialog(title, text, items, okLabel) {
  const dialog = $('confirm-dialog');
  $('confirm-title').textContent = title;
  $('confirm-text').textContent = text;
  $('confirm-list').replaceChildren(...items.slice(0, 20).map((i) => h('li', {}, i)),
    items.length > 20 ? h('li', { class: 'muted' }, `and ${items.length - 20} more`) : '');
  $('confirm-ok').textContent = okLabel;
  dialog.showModal();
  return new Promise((resolve) => {
    const finish = (value) => {
      $('confirm-ok').onclick = null;
      $('confirm-cancel').onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(value);
    };
    $('confirm-ok').onclick = () => finish(true);
    $('confirm-cancel').onclick = () => finish(false);
    dialog.onclose = () => finish(false);
  });
}

// Explain ---------------------------------------------------------------------

async function explain(main) {
  const config = state.config || (await loadConfig());
  const s = state.explain;
  const result = h('div', { id: 'explain-result' });
  const form = h('form', { class: 'explain-form', id: 'explain-form', onsubmit: async (e) => {
    e.preventDefault();
    s.event = form.elements.event.value.trim();
    s.object_id = form.elements.object_id.value.trim();
    s.data = form.elements.data.value;
    let data;
    try {
      data = s.data.trim() ? JSON.parse(s.data) : {};
    } catch (err) {
      result.replaceChildren(h('div', { class: 'alert bad', id: 'explain-error' }, `The data is not valid JSON: ${err.message}`));
      return;
    }
    const objectId = /^-?\d+$/.test(s.object_id) ? Number(s.object_id) : (s.object_id || undefined);
    try {
      const answer = await api('/v1/explain', { method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ event: s.event, data, object_id: objectId }) });
      s.answer = answer;
      result.replaceChildren(...explainView(answer));
    } catch (err) {
      result.replaceChildren(h('div', { class: 'alert bad', id: 'explain-error' }, err.message));
    }
  } },
  h('datalist', { id: 'explain-events' }, Object.keys(config.events).map((e) => h('option', { value: e }))),
  h('div', { class: 'explain-row' },
    h('label', { class: 'field' }, h('span', {}, 'Event'), h('input', { name: 'event', id: 'explain-event', list: 'explain-events', value: s.event, required: true, size: 32 })),
    h('label', { class: 'field' }, h('span', {}, 'Object id'), h('input', { name: 'object_id', id: 'explain-object-id', value: s.object_id, size: 8 }))),
  h('label', { class: 'field wide' }, h('span', {}, 'Data (a JSON object, as the billing sends in "data")'),
    h('textarea', { name: 'data', id: 'explain-data', rows: 10, spellcheck: 'false' }, s.data)),
  h('div', {}, h('button', { type: 'submit', class: 'primary', id: 'explain-submit' }, 'Explain')));
  if (!s.answer) {
    result.replaceChildren(emptyState('Nothing explained yet.',
      'Give an event name and its data, then press Explain. The answer uses the config the sidecar runs now.'));
  } else {
    result.replaceChildren(...explainView(s.answer));
  }
  main.replaceChildren(h('h1', {}, 'Explain'),
    h('p', { class: 'muted' }, 'Which handlers an event with this data would run under the live config, in which order, ' +
      'and why the others would not. Nothing is called: filters are evaluated on the data given, as if every before-stage handler allowed it unchanged.'),
    h('div', { class: 'explain-layout' }, form, result));
}

function explainView(a) {
  const out = [h('h2', { class: 'explain-title' }, code(a.event), `, object_id ${a.object_id}`, h('span', { class: 'muted small' }, ` · config generation ${a.generation}`))];
  if (!a.known) {
    out.push(h('p', { class: 'alert warn' }, `⚠ ${a.event} is neither in the catalogue nor in [events] extra`,
      a.suggestion ? ` (did you mean ${a.suggestion}?)` : '', '; only handlers with a "*" or prefix pattern take it.'));
  }
  const list = (items, empty, id) => (items.length
    ? h('ol', { class: 'run-list', id }, items.map((x) => h('li', { dataset: { handler: x.name } }, h('strong', {}, x.name),
      h('span', { class: 'muted' }, ` priority ${x.priority} `), code(x.target), x.modifies ? h('span', { class: 'badge neutral' }, 'may change the data') : null)))
    : h('p', { class: 'muted', id }, empty));
  out.push(h('h3', {}, 'Before stage, in this order'), list(a.before, 'none', 'explain-before'));
  if (a.denied) out.push(h('p', { class: 'alert bad', id: 'explain-denied' }, `✕ ${a.denied.handler} ${a.denied.reason}`));
  out.push(h('h3', {}, 'After stage, once the event is allowed'), list(a.after, a.denied ? 'none: denied' : 'none', 'explain-after'));
  if (a.not_run.length) {
    out.push(h('h3', {}, 'Not run'), table(['handler', 'stage', 'why not'], a.not_run.map((x) =>
      h('tr', { dataset: { handler: x.name } }, h('td', {}, x.name), h('td', {}, stageTag(x.stage)), h('td', {}, x.reason))), 'explain-not-run'));
  }
  out.push(h('details', {}, h('summary', {}, 'As provisiond explain prints it'), h('pre', { class: 'explain-text' }, a.text)));
  return out;
}

// ---------------------------------------------------------------------------- start

document.addEventListener('DOMContentLoaded', () => {
  $('token-form').addEventListener('submit', tokenEntered);
  $('token-dialog').addEventListener('cancel', (e) => e.preventDefault());
  $('token-forget').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    updateSession();
    route();
  });
  $('notice-close').addEventListener('click', () => {
    $('notice').hidden = true;
  });
  window.addEventListener('hashchange', route);
  updateSession();
  route();
});
