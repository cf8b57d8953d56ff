// Drives the operator console and GraphiQL in Debian's Chromium, with every request outside
// 127.0.0.1 refused, and takes a screenshot of each page. Prints one JSON object of what it
// saw; any failed step throws (exit code 1).
//
//   ORDERLY_NODE_DIR=DIR node console-browser.mjs '{"base": ..., "link": ..., "order": ...,
//     "deadLetter": ..., "adminToken": ..., "screenshots": DIR, "readsBase": ...,
//     "parkedRetry": ..., "parkedSkip": ...}'
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const require = createRequire(`${process.env.ORDERLY_NODE_DIR ?? '.'}/`);
const { chromium } = require('playwright-core');

const input = JSON.parse(process.argv[2]);
const seen = { foreign: [], steps: [], dialogs: [] };
const step = (name) => seen.steps.push(name);
const TIMEOUT = 15000;

async function restock(quantity) {
  const response = await fetch(`${input.base}/graphql`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${input.adminToken}` },
    body: JSON.stringify({
      query: 'mutation($q: Int!) { restock(sku: "CON-1", quantity: $q) { events } }',
      variables: { q: quantity },
    }),
  });
  const body = await response.json();
  if (body.errors) throw new Error(`restock failed: ${JSON.stringify(body.errors)}`);
}

/// Restocks until `locator` shows: a subscription follows the log from when it is set up,
/// which a page under load may take a moment to finish.
async function restockUntilSeen(locator) {
  for (let attempt = 1; ; attempt += 1) {
    await restock(attempt);
    try {
      await locator.waitFor({ timeout: 2000 });
      return;
    } catch (error) {
      if (attempt === 6) throw error;
    }
  }
}

const profile = mkdtempSync(join(tmpdir(), 'orderly-chromium-'));
mkdirSync(input.screenshots, { recursive: true });
// A fresh profile (--user-data-dir, which Playwright passes for a persistent context).
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.ORDERLY_CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1400, height: 900 },
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
try {
  // Only this machine: anything else is refused and remembered, and fails the test.
  await context.route('**/*', (route) => {
    const url = new URL(route.request().url());
    if (url.hostname === '127.0.0.1' || url.protocol === 'data:') return route.continue();
    seen.foreign.push(url.href);
    return route.abort();
  });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const pageErrors = [];
  page.on('pageerror', (error) => pageErrors.push(error.message));
  page.on('dialog', (dialog) => {
    seen.dialogs.push(dialog.message());
    dialog.accept();
  });

  // Sign in through the link `orderly console-link` printed.
  await page.goto(input.link);
  await page.locator('#nav').waitFor({ state: 'visible' });
  await page.locator('#who').filter({ hasText: 'admin' }).waitFor();
  if (page.url().includes('token=')) throw new Error('the token stayed in the address bar');
  step('signed in');

  // The log: the order's events are there; one opens with payload, metadata and trace id.
  await page.locator('tr.event[data-type="OrderPlaced"]').first().click();
  await page.locator('#event-detail').filter({ hasText: 'Payload' }).waitFor();
  await page.screenshot({ path: join(input.screenshots, 'log.png') });
  step('log');

  // An order's story: its events beside its row, with the row's freshness.
  await page.goto(`${input.base}/console#/order/${input.order}`);
  await page.locator('#order-row').filter({ hasText: input.order }).waitFor();
  await page.locator('tr.event[data-type="OrderPlaced"]').waitFor();
  seen.freshness = await page.locator('#freshness').innerText();
  await page.screenshot({ path: join(input.screenshots, 'order.png') });
  step('order');

  // Projections: the dead letter is retried after the confirmation.
  await page.goto(`${input.base}/console#/projections`);
  const letter = page.locator(`tr[data-dead-letter="${input.deadLetter}"]`);
  await letter.waitFor();
  await page.locator('tr[data-projection="orders"]').waitFor();
  await page.screenshot({ path: join(input.screenshots, 'projections.png') });
  await letter.locator('button.retry').click();
  await page.locator('#notice.ok').filter({ hasText: 'applied and resolved' }).waitFor();
  await letter.waitFor({ state: 'detached' });
  step('dead letter retried');

  // A rebuild of the orders projection, confirmed, followed to the swap.
  const rebuild = page.locator('tr[data-projection="orders"] td.rebuild');
  await rebuild.locator('button.rebuild').click();
  await page.locator('tr[data-projection="orders"] td.rebuild[data-rebuild-state="done"]').waitFor();
  await page.locator('#notice.ok').filter({ hasText: 'orders rebuilt and swapped in' }).waitFor();
  seen.rebuild = await rebuild.innerText();
  await page.screenshot({ path: join(input.screenshots, 'rebuild.png') });
  step('rebuild');

  // The saga: its 16 lanes, the parked events and an outbox dead letter; one parked event is
  // retried and the other skipped, each after a confirmation.
  await page.goto(`${input.base}/console#/saga`);
  await page.locator('#saga-lanes tr[data-lane="15"]').waitFor();
  const retried = page.locator(`tr[data-parked-event="${input.parkedRetry}"]`);
  const skipped = page.locator(`tr[data-parked-event="${input.parkedSkip}"]`);
  await retried.waitFor();
  await skipped.waitFor();
  await page.locator('#saga-outbox tr[data-outbox-message]').waitFor();
  seen.sagaLanes = await page.locator('#saga-lanes tr[data-lane]').count();
  await page.screenshot({ path: join(input.screenshots, 'saga.png'), fullPage: true });
  step('saga');
  await retried.locator('button.retry').click();
  await page.locator('#notice.ok').filter({ hasText: 'retry requested' }).waitFor();
  await skipped.locator('button.skip').click();
  await page.locator('#notice.ok').filter({ hasText: 'skipped' }).waitFor();
  await skipped.waitFor({ state: 'detached' });
  step('saga parked event retried and skipped');

  // A read API alone serves the console without the saga's operations, and says so.
  const reads = await context.newPage();
  reads.setDefaultTimeout(TIMEOUT);
  reads.on('pageerror', (error) => pageErrors.push(`read API: ${error.message}`));
  await reads.goto(`${input.readsBase}/console#token=${encodeURIComponent(input.adminToken)}`);
  await reads.locator('#nav').waitFor({ state: 'visible' });
  await reads.goto(`${input.readsBase}/console#/saga`);
  await reads.locator('#saga-summary.not-served').filter({ hasText: 'orderly read-api' }).waitFor();
  await reads.close();
  step('saga not served by a read API alone');

  // The live tail receives an event appended while it watches.
  await page.goto(`${input.base}/console#/log`);
  await page.locator('input[name="category"]').fill('product');
  await page.locator('#tail').click();
  await page.locator('#tail-state').filter({ hasText: 'live' }).waitFor();
  await restockUntilSeen(page.locator('tbody.live tr.event[data-type="ProductRestocked"]').first());
  await page.screenshot({ path: join(input.screenshots, 'tail.png') });
  step('tail');

  // GraphiQL from the binary: a query shows extensions.consistency; a subscription runs.
  const graphiql = await context.newPage();
  graphiql.setDefaultTimeout(TIMEOUT);
  graphiql.on('pageerror', (error) => pageErrors.push(`graphiql: ${error.message}`));
  // Runs on every load of the page before GraphiQL reads its storage, and so after whatever
  // GraphiQL saved while the page before went away: the first load, and a load asked for with
  // a `next-query`, open that query alone.
  await graphiql.addInitScript(([token]) => {
    const next = sessionStorage.getItem('next-query');
    if (!sessionStorage.getItem('seeded') || next) {
      sessionStorage.setItem('seeded', '1');
      sessionStorage.removeItem('next-query');
      localStorage.removeItem('graphiql:tabState');
      localStorage.setItem('graphiql:query', next ?? '{ products(first: 3) { nodes { sku available } } }');
      localStorage.setItem('graphiql:headers', JSON.stringify({ Authorization: `Bearer ${token}` }));
    }
  }, [input.adminToken]);
  await graphiql.goto(`${input.base}/graphql`);
  await graphiql.locator('.graphiql-execute-button').click();
  await graphiql.locator('.result-window').filter({ hasText: 'consistency' }).waitFor();
  await graphiql.locator('.result-window').filter({ hasText: 'lagMs' }).waitFor();
  await graphiql.screenshot({ path: join(input.screenshots, 'graphiql.png') });
  step('graphiql query');
  // Not written to GraphiQL's storage from here: it saves its tabs as the page unloads, over
  // what was written (which made this step open the previous query now and then).
  await graphiql.evaluate(() => {
    sessionStorage.setItem('next-query', 'subscription { events(category: "product") { type stream } }');
  });
  await graphiql.reload();
  await graphiql.locator('.graphiql-query-editor').filter({ hasText: 'events(category' }).waitFor();
  await graphiql.locator('.graphiql-execute-button').click();
  await restockUntilSeen(graphiql.locator('.result-window').filter({ hasText: 'ProductRestocked' }))
    .catch(async (error) => {
      await graphiql.screenshot({ path: join(input.screenshots, 'graphiql-failed.png') });
      throw error;
    });
  step('graphiql subscription');

  seen.pageErrors = pageErrors;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(seen));
