// The console's only way to the server: the public GraphQL API at /graphql, over HTTP for
// queries and mutations and over a WebSocket (graphql-transport-ws) for subscriptions.

const TOKEN_KEY = 'orderly.console.token';

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/// The claims of the token, unverified (the server verifies; this only labels the page).
export function claims() {
  const raw = token();
  if (!raw) return null;
  try {
    const payload = raw.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(payload));
  } catch (_) {
    return null;
  }
}

/// An error the API answered with; `code` is the contract's `extensions.code`.
export class ApiError extends Error {
  constructor(message, code) {
    super(message);
    this.code = code;
  }
}

/// Runs one operation; resolves to { data, extensions } or rejects with an ApiError.
export async function gql(query, variables = {}) {
  const headers = {
    'content-type': 'application/json',
    accept: 'application/graphql-response+json, application/json;q=0.9',
  };
  const bearer = token();
  if (bearer) headers.authorization = `Bearer ${bearer}`;
  let response;
  try {
    response = await fetch('/graphql', {
      method: 'POST',
      headers,
      body: JSON.stringify({ query, variables }),
    });
  } catch (error) {
    throw new ApiError(`the server did not answer (${error.message})`, 'UNAVAILABLE');
  }
  let body;
  try {
    body = await response.json();
  } catch (_) {
    throw new ApiError(`the server answered ${response.status} without JSON`, 'INTERNAL');
  }
  if (body.errors && body.errors.length) {
    const first = body.errors[0];
    throw new ApiError(first.message, first.extensions && first.extensions.code);
  }
  return { data: body.data, extensions: body.extensions || {} };
}

let client = null;

/// Subscribes; `onNext` gets each `data`, `onError` an Error. Returns a function that stops.
export function subscribe(query, variables, onNext, onError) {
  if (!client) {
    const url = new URL('/graphql', location.href);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    client = window.graphqlWs.createClient({
      url: url.href,
      lazy: true,
      connectionParams: () => (token() ? { Authorization: `Bearer ${token()}` } : {}),
    });
  }
  return client.subscribe(
    { query, variables },
    {
      next: (message) => {
        if (message.errors && message.errors.length) {
          onError(new ApiError(message.errors[0].message, message.errors[0].extensions?.code));
        } else {
          onNext(message.data);
        }
      },
      error: (error) => onError(error instanceof Error ? error : new Error(String(error.reason || error.type || error))),
      complete: () => {},
    },
  );
}

/// Drops the WebSocket, so the next subscription connects with the current token.
export function resetSubscriptions() {
  if (client) client.dispose();
  client = null;
}
