// The console's pages. Each takes the element to fill and { notify, arg }, and returns a
// function that stops what it started (subscriptions) when the operator leaves it.
import { ApiError, gql, subscribe } from './api.js';

/// An element with attributes and children (strings become text, never HTML).
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name.startsWith('on')) element.addEventListener(name.slice(2), value);
    else if (value !== false && value != null) element.setAttribute(name, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child != null) element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

const EVENT_FIELDS = 'id stream type version position recordedAt data metadata';

function when(text) {
  return text ? new Date(text).toLocaleString() : '–';
}

/// The trace id of a W3C traceparent (`00-<trace id>-<span id>-<flags>`).
function traceId(metadata) {
  const parent = metadata && metadata.traceparent;
  return typeof parent === 'string' ? parent.split('-')[1] || null : null;
}

function failure(notify, error) {
  const code = error instanceof ApiError && error.code ? `${error.code}: ` : '';
  notify(`${code}${error.message}`, 'error');
}

function json(value) {
  return h('pre', { class: 'json' }, JSON.stringify(value, null, 2));
}

/// One event, opened: payload, metadata, trace id.
function eventDetail(event) {
  const trace = traceId(event.metadata);
  return h(
    'section',
    { class: 'card detail', id: 'event-detail' },
    h('h2', {}, `${event.type} `, h('small', {}, `${event.stream} @ ${event.version}`)),
    h('dl', {},
      h('dt', {}, 'event id'), h('dd', {}, h('code', {}, event.id)),
      h('dt', {}, 'position'), h('dd', {}, h('code', {}, event.position)),
      h('dt', {}, 'recorded'), h('dd', {}, when(event.recordedAt)),
      h('dt', {}, 'trace id'), h('dd', {}, trace ? h('code', { class: 'trace' }, trace) : '–'),
    ),
    h('h3', {}, 'Payload'), json(event.data),
    h('h3', {}, 'Metadata'), json(event.metadata),
  );
}

function eventRow(event, open) {
  const row = h(
    'tr',
    { class: 'event', tabindex: 0, 'data-type': event.type },
    h('td', {}, h('code', {}, event.position)),
    h('td', {}, h('a', { href: `#/log/${event.stream}` }, event.stream)),
    h('td', { class: 'num' }, event.version),
    h('td', {}, event.type),
    h('td', {}, when(event.recordedAt)),
  );
  row.addEventListener('click', (e) => {
    if (e.target.tagName !== 'A') open(event);
  });
  row.addEventListener('keydown', (e) => e.key === 'Enter' && open(event));
  return row;
}

function eventTable(...bodies) {
  return h('table', { class: 'events' },
    h('thead', {}, h('tr', {},
      h('th', {}, 'position'), h('th', {}, 'stream'), h('th', {}, 'version'),
      h('th', {}, 'type'), h('th', {}, 'recorded'))),
    bodies);
}

/// The log, or one stream of it (`#/log/<stream>`), page by page, with a live tail.
function log(main, { notify, arg }) {
  const filters = {
    stream: h('input', { name: 'stream', placeholder: 'order-…', value: arg || '' }),
    category: h('input', { name: 'category', placeholder: 'order, product, payment' }),
    type: h('input', { name: 'type', placeholder: 'OrderPlaced' }),
  };
  const tbody = h('tbody');
  // Events the tail brings, newest first, above the page of the log.
  const live = h('tbody', { class: 'live' });
  const more = h('button', { type: 'button', hidden: true }, 'Older events: load more');
  const tailButton = h('button', { type: 'button', id: 'tail' }, 'Start live tail');
  const tailState = h('span', { class: 'muted', id: 'tail-state' }, '');
  const detail = h('div', { class: 'side' }, h('p', { class: 'muted' }, 'Select an event to see its payload, metadata and trace id.'));
  let after = null;
  let stop = null;

  const open = (event) => detail.replaceChildren(eventDetail(event));
  const values = () => Object.fromEntries(
    Object.entries(filters).map(([k, input]) => [k, input.value.trim() || null]));

  async function load(fresh) {
    if (fresh) {
      after = null;
      tbody.replaceChildren();
      live.replaceChildren();
    }
    const query = `query($stream: String, $category: String, $type: String, $after: ConsistencyToken) {
      events(stream: $stream, category: $category, type: $type, after: $after, first: 50) {
        events { ${EVENT_FIELDS} } endCursor hasMore } }`;
    try {
      const { data } = await gql(query, { ...values(), after });
      const page = data.events;
      for (const event of page.events) tbody.append(eventRow(event, open));
      after = page.endCursor;
      more.hidden = !page.hasMore;
      if (!tbody.children.length) tbody.append(h('tr', {}, h('td', { colspan: 5, class: 'muted' }, 'No events match.')));
    } catch (error) {
      failure(notify, error);
    }
  }

  function toggleTail() {
    if (stop) {
      stop();
      stop = null;
      tailButton.textContent = 'Start live tail';
      tailState.textContent = 'tail stopped';
      return;
    }
    const { stream, category } = values();
    const query = `subscription($stream: String, $category: String) {
      events(stream: $stream, category: $category) { ${EVENT_FIELDS} } }`;
    // The page below shows the same filter as the tail above it.
    load(true);
    stop = subscribe(query, { stream, category }, (data) => {
      const event = data.events;
      if (values().type && values().type !== event.type) return;
      live.prepend(eventRow(event, open));
      tailState.textContent = `live: ${live.children.length} new`;
    }, (error) => {
      failure(notify, error);
      tailState.textContent = 'tail ended';
      tailButton.textContent = 'Start live tail';
      stop = null;
    });
    tailButton.textContent = 'Stop live tail';
    tailState.textContent = 'live: waiting for events';
  }

  const form = h('form', { class: 'filters' },
    h('label', {}, 'Stream ', filters.stream),
    h('label', {}, 'Category ', filters.category),
    h('label', {}, 'Type ', filters.type),
    h('button', { type: 'submit' }, 'Show'),
    tailButton, tailState);
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    if (stop) toggleTail();
    load(true);
  });
  tailButton.addEventListener('click', toggleTail);
  more.addEventListener('click', () => load(false));
  main.append(
    h('h1', {}, arg ? `Stream ${arg}` : 'Log'),
    form,
    h('div', { class: 'split' }, h('div', { class: 'main-col' }, eventTable(live, tbody), more), detail),
  );
  load(true);
  return () => stop && stop();
}

/// An order's story: its events beside its read-model row and the row's freshness.
function order(main, { notify, arg }) {
  const input = h('input', { name: 'order', placeholder: 'order id (UUID)', value: arg || '', size: 40 });
  const body = h('div', { class: 'split' });
  const recent = h('div', { class: 'card' }, h('p', { class: 'muted' }, 'Loading recent orders…'));

  async function show(id) {
    body.replaceChildren(h('p', { class: 'muted' }, 'Loading…'));
    const query = `query($id: UUID!) {
      order(id: $id) { id customerId status version placedAt updatedAt cancellationReason
        total { amountMinor currency } lines { sku name quantity lineTotal { amountMinor currency } }
        history { status at reason } payment { status attempts failureReason } }
      orderEvents(orderId: $id) { ${EVENT_FIELDS} } }`;
    try {
      const { data, extensions } = await gql(query, { id });
      const c = extensions.consistency || {};
      const tbody = h('tbody');
      const detail = h('div');
      for (const event of data.orderEvents) tbody.append(eventRow(event, (e) => detail.replaceChildren(eventDetail(e))));
      const row = data.order
        ? json(data.order)
        : h('p', { class: 'muted' }, 'No read-model row (yet): the projection has not applied the order.');
      const behind = data.order && data.orderEvents.length && data.order.version < data.orderEvents.length - 1;
      body.replaceChildren(
        h('section', { class: 'main-col' }, h('h2', {}, `Events (${data.orderEvents.length})`), eventTable(tbody), detail),
        h('section', { class: 'side card', id: 'order-row' },
          h('h2', {}, 'Read model'),
          h('p', { class: `freshness ${c.stale || behind ? 'stale' : 'fresh'}`, id: 'freshness' },
            `consistency: token ${c.token || '–'}, lag ${c.lagMs ?? '–'} ms, `,
            c.stale ? 'stale' : 'not stale',
            behind ? ` · row at version ${data.order.version}, stream at ${data.orderEvents.length - 1}` : ''),
          row),
      );
      if (!data.orderEvents.length) notify(`no events for order ${id}`, 'error');
    } catch (error) {
      body.replaceChildren();
      failure(notify, error);
    }
  }

  const form = h('form', { class: 'filters' }, h('label', {}, 'Order ', input), h('button', { type: 'submit' }, 'Show'));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    location.hash = `#/order/${input.value.trim()}`;
  });
  main.append(h('h1', {}, 'Order story'), form, body, recent);
  if (arg) {
    show(arg);
    recent.remove();
  } else {
    gql('{ orders(first: 15) { nodes { id customerId status placedAt total { amountMinor currency } } } }')
      .then(({ data }) => {
        recent.replaceChildren(h('h2', {}, 'Recent orders'), h('ul', { class: 'orders' },
          data.orders.nodes.map((o) => h('li', {},
            h('a', { href: `#/order/${o.id}` }, o.id), ` ${o.customerId} · ${o.status} · `,
            `${(o.total.amountMinor / 100).toFixed(2)} ${o.total.currency} · ${when(o.placedAt)}`))));
      })
      .catch((error) => failure(notify, error));
  }
  return null;
}

const REBUILD_FIELDS = 'projection state events total eventsPerSecond startedAt finishedAt error';
/// How often a running rebuild's progress is asked for.
const REBUILD_POLL_MS = 500;

/// A count as the operator reads it: 12,345.
function count(n) {
  return Number(n).toLocaleString();
}

/// What a rebuild has done so far, into `cell`: a bar while it runs, then done or the error.
function showRebuild(cell, rebuild) {
  cell.dataset.rebuildState = rebuild.state.toLowerCase();
  const rate = `${count(Math.round(rebuild.eventsPerSecond))} events/s`;
  if (rebuild.state === 'RUNNING') {
    const total = rebuild.total == null ? null : Number(rebuild.total);
    const share = total ? Math.min(100, Math.floor((100 * Number(rebuild.events)) / total)) : null;
    const done = total == null ? `${count(rebuild.events)} events`
      : `${share ?? 100}% (${count(rebuild.events)} of ${count(total)} events)`;
    return [
      h('progress', total ? { max: total, value: rebuild.events } : {}),
      h('span', { class: 'rebuild-progress' }, ` ${done}, ${rate}`),
    ];
  }
  if (rebuild.state === 'DONE') {
    return h('span', { class: 'rebuild-done' },
      `rebuilt: ${count(rebuild.events)} events, ${rate}, swapped in ${when(rebuild.finishedAt)}`);
  }
  return h('span', { class: 'rebuild-failed' }, `rebuild failed ${when(rebuild.finishedAt)}: ${rebuild.error}`);
}

/// Projections: state, checkpoint, lag, rebuilds started and followed, and their dead letters
/// with retry and skip.
function projections(main, { notify }) {
  // Each projection's rebuild cell lives across the table's refreshes: its progress is polled
  // on its own, faster than the table.
  const rebuilds = new Map();
  const polls = new Set();

  function rebuildCell(name) {
    if (!rebuilds.has(name)) {
      const status = h('span', { class: 'rebuild-status' });
      const button = h('button', { type: 'button', class: 'rebuild', onclick: () => startRebuild(name) }, 'Rebuild');
      rebuilds.set(name, { cell: h('td', { class: 'rebuild' }, button, ' ', status), button, status });
      follow(name);
    }
    return rebuilds.get(name).cell;
  }

  function render(name, rebuild) {
    const { button, status } = rebuilds.get(name);
    button.disabled = rebuild != null && rebuild.state === 'RUNNING';
    status.replaceChildren(...(rebuild ? [showRebuild(rebuilds.get(name).cell, rebuild)].flat() : []));
  }

  /// Shows the last rebuild of `name`, asking again every REBUILD_POLL_MS while it runs.
  function follow(name, started = false) {
    const poll = setInterval(ask, REBUILD_POLL_MS);
    polls.add(poll);
    // Only an end seen happening is announced, not one found when the page opens.
    let running = started;
    async function ask() {
      try {
        const { data } = await gql(`query($name: String!) { projectionRebuild(name: $name) { ${REBUILD_FIELDS} } }`, { name });
        const rebuild = data.projectionRebuild;
        render(name, rebuild);
        if (rebuild != null && rebuild.state === 'RUNNING') {
          running = true;
          return;
        }
        clearInterval(poll);
        polls.delete(poll);
        if (running && rebuild.state === 'DONE') notify(`${name} rebuilt and swapped in`, 'ok');
        if (running && rebuild.state === 'FAILED') notify(`rebuild of ${name} failed: ${rebuild.error}`, 'error');
      } catch (error) {
        clearInterval(poll);
        polls.delete(poll);
        failure(notify, error);
      }
    }
    ask();
  }

  async function startRebuild(name) {
    if (!window.confirm(`Rebuild projection ${name}?\nThis replays the whole log into shadow tables while the live ones keep serving, checks them and swaps them in.`)) return;
    try {
      const { data } = await gql(`mutation($name: String!) { startProjectionRebuild(name: $name) { ${REBUILD_FIELDS} } }`, { name });
      render(name, data.startProjectionRebuild);
      notify(`rebuild of ${name} started`, 'info');
      follow(name, true);
    } catch (error) {
      failure(notify, error);
    }
  }

  const table = h('tbody');
  const letters = h('tbody');
  const showResolved = h('input', { type: 'checkbox', id: 'resolved' });

  async function refresh() {
    try {
      const { data } = await gql(`query($all: Boolean!) {
        projections { name state position lagEvents lagMs deadLetters }
        deadLetters(includeResolved: $all) { id projection stream version type error parkedAt resolution } }`,
      { all: showResolved.checked });
      table.replaceChildren(...data.projections.map((p) => h('tr', { 'data-projection': p.name },
        h('td', {}, p.name),
        h('td', {}, h('span', { class: `state ${p.state.toLowerCase()}` }, p.state)),
        h('td', {}, h('code', {}, p.position || '–')),
        h('td', { class: 'num' }, p.lagEvents ?? '–'),
        h('td', { class: 'num' }, p.lagMs ?? '–'),
        h('td', { class: 'num' }, p.deadLetters),
        rebuildCell(p.name))));
      letters.replaceChildren(...(data.deadLetters.length ? data.deadLetters.map(letterRow)
        : [h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'No dead letters.'))]));
    } catch (error) {
      failure(notify, error);
    }
  }

  async function act(what, letter) {
    const verb = what === 'retry' ? 'Retry' : 'Skip';
    const consequence = what === 'retry'
      ? 'apply the event again (read anew from the log)'
      : 'mark it resolved WITHOUT applying the event';
    if (!window.confirm(`${verb} dead letter ${letter.id} of ${letter.projection} (${letter.type} on ${letter.stream})?\nThis will ${consequence}.`)) return;
    const mutation = what === 'retry'
      ? 'mutation($id: Long!) { retryDeadLetter(id: $id) { applied error } }'
      : 'mutation($id: Long!) { skipDeadLetter(id: $id) }';
    try {
      const { data } = await gql(mutation, { id: letter.id });
      if (what === 'retry' && !data.retryDeadLetter.applied) notify(`dead letter ${letter.id} failed again: ${data.retryDeadLetter.error}`, 'error');
      else notify(`dead letter ${letter.id} ${what === 'retry' ? 'applied and resolved' : 'skipped'}`, 'ok');
    } catch (error) {
      failure(notify, error);
    }
    refresh();
  }

  function letterRow(letter) {
    const open = !letter.resolution;
    return h('tr', { 'data-dead-letter': letter.id },
      h('td', { class: 'num' }, letter.id),
      h('td', {}, letter.projection),
      h('td', {}, h('a', { href: `#/log/${letter.stream}` }, `${letter.stream} @ ${letter.version}`), h('br'), letter.type),
      h('td', { class: 'error' }, letter.error),
      h('td', {}, when(letter.parkedAt)),
      h('td', {}, open
        ? [h('button', { type: 'button', class: 'retry', onclick: () => act('retry', letter) }, 'Retry'), ' ',
          h('button', { type: 'button', class: 'skip danger', onclick: () => act('skip', letter) }, 'Skip')]
        : letter.resolution));
  }

  showResolved.addEventListener('change', refresh);
  main.append(
    h('h1', {}, 'Projections'),
    h('table', {}, h('thead', {}, h('tr', {}, ['name', 'state', 'checkpoint', 'lag (events)', 'lag (ms)', 'dead letters', 'rebuild'].map((t) => h('th', {}, t)))), table),
    h('p', { class: 'muted' }, 'A rebuild replays the log into shadow tables while the live ones serve, checks them and swaps them in. ',
      'One started here runs in this server; one started with ', h('code', {}, 'orderly projections rebuild NAME'),
      ' shows here as the state REBUILDING.'),
    h('h2', {}, 'Dead letters ', h('label', { class: 'small' }, showResolved, ' show resolved')),
    h('table', {}, h('thead', {}, h('tr', {}, ['id', 'projection', 'event', 'error', 'parked', ''].map((t) => h('th', {}, t)))), letters),
  );
  refresh();
  const timer = setInterval(refresh, 5000);
  return () => {
    clearInterval(timer);
    polls.forEach(clearInterval);
  };
}

/// The saga's operations are the command side's: a read API serving alone answers that it
/// has no such field.
function sagaNotServed(error) {
  return error instanceof ApiError && /Unknown field "(sagaStatus|sagaParkedEvents|outboxDeadLetters)"/.test(error.message);
}

/// How far behind the log a saga lane is.
function laneLag(lane) {
  if (lane.caughtUp == null) return 'unknown (the log is not in this database)';
  if (lane.caughtUp) return 'caught up';
  return `oldest unhandled event ${Number(lane.behindSeconds).toFixed(1)} s old`;
}

/// What retrying and skipping do, for the confirmations.
const SAGA_ACTIONS = {
  parked: {
    retry: {
      mutation: 'mutation($id: UUID!) { retryParkedSagaEvent(eventId: $id) }',
      consequence: 'The lane that owns it feeds it to the saga again within seconds; if the step fails again it is parked again.',
      done: 'retry requested',
    },
    skip: {
      mutation: 'mutation($id: UUID!) { skipParkedSagaEvent(eventId: $id) }',
      consequence: 'The saga will NEVER be fed this event again: the order\'s stock and payment deadlines still read the reservations and the payment, and a parked placement, cancel or shipment is still acted on (the saga kept it when it parked it).',
      done: 'skipped',
    },
  },
  outbox: {
    retry: {
      mutation: 'mutation($id: UUID!) { retryOutboxMessage(outboxId: $id) }',
      consequence: 'It goes back in line with fresh attempts; a running saga runner delivers it.',
      done: 'put back in line',
    },
    skip: {
      mutation: 'mutation($id: UUID!) { skipOutboxMessage(outboxId: $id) }',
      consequence: 'It will NOT be delivered.',
      done: 'skipped',
    },
  },
};

/// The saga: its lanes (owner, generation, checkpoint, lag), its parked events and the
/// outbox's dead letters, with retry and skip. Served where the command side is
/// (`orderly serve`); a read API alone says so.
function saga(main, { notify }) {
  const summary = h('p', { id: 'saga-summary', class: 'muted' }, 'Loading…');
  const lanes = h('tbody', { id: 'saga-lanes' });
  const parked = h('tbody', { id: 'saga-parked' });
  const outbox = h('tbody', { id: 'saga-outbox' });
  const tables = h('div', {},
    h('h2', {}, 'Lanes'),
    h('table', {}, h('thead', {}, h('tr', {}, ['lane', 'owner', 'generation', 'checkpoint', 'lag'].map((t) => h('th', {}, t)))), lanes),
    h('h2', {}, 'Parked events'),
    h('p', { class: 'muted' }, 'Events a saga step failed on for good, set aside so their lane could go on.'),
    h('table', {}, h('thead', {}, h('tr', {}, ['event', 'order', 'error', 'attempts', 'parked', ''].map((t) => h('th', {}, t)))), parked),
    h('h2', {}, 'Outbox dead letters'),
    h('p', { class: 'muted' }, 'Gateway calls and notifications the outbox worker could not deliver.'),
    h('table', {}, h('thead', {}, h('tr', {}, ['message', 'order', 'last error', 'attempts', 'dead-lettered', ''].map((t) => h('th', {}, t)))), outbox),
  );
  let timer = null;

  function empty(colspan, text) {
    return [h('tr', {}, h('td', { colspan, class: 'muted empty' }, text))];
  }

  function orderLink(orderId) {
    return orderId ? h('a', { href: `#/order/${orderId}` }, h('code', {}, orderId)) : '–';
  }

  function actions(kind, id, label) {
    return [
      h('button', { type: 'button', class: 'retry', onclick: () => act(kind, 'retry', id, label) }, 'Retry'), ' ',
      h('button', { type: 'button', class: 'skip danger', onclick: () => act(kind, 'skip', id, label) }, 'Skip'),
    ];
  }

  /// A refund or a resolution is not skipped from here: money would stay taken, or unknown.
  /// The CLI records what was found outside Orderly, and skips it then.
  const SETTLED_ELSEWHERE = {
    refund: ['refunded another way? ', '--refunded-elsewhere'],
    resolve: ['no charge at the provider? ', '--not-charged'],
  };

  function moneyActions(message, label) {
    const [question, flag] = SETTLED_ELSEWHERE[message.kind];
    return [
      h('button', { type: 'button', class: 'retry', onclick: () => act('outbox', 'retry', message.outboxId, label) }, 'Retry'),
      h('div', { class: 'muted small' }, question,
        h('code', {}, `orderly saga outbox skip ${message.outboxId} ${flag}`)),
    ];
  }

  function parkedRow(event) {
    const label = `parked event ${event.eventId} (${event.type} on ${event.stream})`;
    return h('tr', { 'data-parked-event': event.eventId },
      h('td', {}, h('a', { href: `#/log/${event.stream}` }, event.stream), h('br'), event.type),
      h('td', {}, orderLink(event.orderId)),
      h('td', { class: 'error' }, event.error),
      h('td', { class: 'num' }, event.attempts),
      h('td', {}, when(event.parkedAt)),
      h('td', {}, actions('parked', event.eventId, label),
        event.retryRequestedAt ? h('div', { class: 'muted small' }, `retry requested ${when(event.retryRequestedAt)}`) : null));
  }

  function outboxRow(message) {
    const label = `outbox message ${message.outboxId} (${message.kind} for order ${message.orderId})`;
    return h('tr', { 'data-outbox-message': message.outboxId },
      h('td', {}, h('code', {}, message.outboxId), h('br'), message.kind),
      h('td', {}, orderLink(message.orderId)),
      h('td', { class: 'error' }, message.lastError ?? '–'),
      h('td', { class: 'num' }, message.attempts),
      h('td', {}, when(message.deadLetteredAt)),
      h('td', {}, message.kind in SETTLED_ELSEWHERE
        ? moneyActions(message, label)
        : actions('outbox', message.outboxId, label)));
  }

  function notServed() {
    clearInterval(timer);
    summary.className = 'not-served';
    summary.replaceChildren(
      'This server does not serve the saga\'s operations: it runs the read API alone (',
      h('code', {}, 'orderly read-api'), '). Open the console of ', h('code', {}, 'orderly serve'),
      ', or use ', h('code', {}, 'orderly saga status'), ', ', h('code', {}, 'orderly saga parked …'),
      ' and ', h('code', {}, 'orderly saga outbox …'), '.');
    tables.hidden = true;
  }

  async function refresh() {
    try {
      const { data } = await gql(`{
        sagaStatus { name members parked inFlight overdue oldestOverdueOrderId lanes { lane owner generation checkpoint caughtUp behindSeconds } }
        sagaParkedEvents { eventId orderId stream type error attempts parkedAt retryRequestedAt }
        outboxDeadLetters { outboxId orderId kind attempts lastError deadLetteredAt } }`);
      const status = data.sagaStatus;
      const members = status.members.length ? status.members.join(', ') : 'none running';
      summary.textContent = `Saga ${status.name}: ${status.lanes.length} lanes; members: ${members}; `
        + `${status.inFlight} instance(s) in flight; ${status.parked} parked event(s); `
        + (status.overdue > 0
          ? `${status.overdue} deadline(s) overdue (oldest: order ${status.oldestOverdueOrderId}; the saga's log names the error); `
          : '')
        + `${data.outboxDeadLetters.length} outbox dead letter(s).`;
      lanes.replaceChildren(...(status.lanes.length ? status.lanes.map((lane) => h('tr', { 'data-lane': lane.lane },
        h('td', { class: 'num' }, lane.lane),
        h('td', {}, lane.owner ?? h('span', { class: 'muted' }, '(free)')),
        h('td', { class: 'num' }, lane.generation),
        h('td', {}, h('code', {}, lane.checkpoint)),
        h('td', {}, laneLag(lane))))
        : empty(5, 'No lanes yet: no saga runner has run against this database.')));
      parked.replaceChildren(...(data.sagaParkedEvents.length ? data.sagaParkedEvents.map(parkedRow)
        : empty(6, 'No parked events.')));
      outbox.replaceChildren(...(data.outboxDeadLetters.length ? data.outboxDeadLetters.map(outboxRow)
        : empty(6, 'No outbox dead letters.')));
    } catch (error) {
      if (sagaNotServed(error)) notServed();
      else failure(notify, error);
    }
  }

  async function act(kind, what, id, label) {
    const action = SAGA_ACTIONS[kind][what];
    const verb = what === 'retry' ? 'Retry' : 'Skip';
    if (!window.confirm(`${verb} ${label}?\n${action.consequence}`)) return;
    try {
      await gql(action.mutation, { id });
      notify(`${label.split(' (')[0]} ${action.done}`, 'ok');
    } catch (error) {
      failure(notify, error);
    }
    refresh();
  }

  main.append(h('h1', {}, 'Saga'), summary, tables);
  refresh();
  timer = setInterval(refresh, 5000);
  return () => clearInterval(timer);
}

export const pages = { log, order, projections, saga };
