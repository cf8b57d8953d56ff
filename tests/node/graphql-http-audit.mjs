// Runs the GraphQL-over-HTTP audits of the `graphql-http` package against a served /graphql
// and prints one JSON array of { id, name, status, reason } (status: ok, warn, error).
//
//   ORDERLY_NODE_DIR=DIR node graphql-http-audit.mjs http://127.0.0.1:8080/graphql
//
// DIR holds the node_modules that deploy/local/test.sh installs from this folder's
// package.json (outside the repository, so the clone stays clean).
import { createRequire } from 'node:module';

const require = createRequire(`${process.env.ORDERLY_NODE_DIR ?? '.'}/`);
const { serverAudits } = require('graphql-http');

const url = process.argv[2];
if (!url) {
  console.error('usage: node graphql-http-audit.mjs URL');
  process.exit(2);
}
const results = [];
for (const audit of serverAudits({ url })) {
  const result = await audit.fn();
  results.push({
    id: audit.id,
    name: audit.name,
    status: result.status,
    reason: result.status === 'ok' ? null : result.reason,
  });
}
console.log(JSON.stringify(results));
