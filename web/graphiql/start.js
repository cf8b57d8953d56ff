// Starts GraphiQL against this server's /graphql: queries and mutations over HTTP,
// subscriptions over a WebSocket on the same URL (graphql-transport-ws). Everything it loads
// comes from this server.
(function start() {
  'use strict';
  const root = document.getElementById('graphiql');
  const endpoint = new URL(root.dataset.endpoint, window.location.href);
  const socket = new URL(endpoint);
  socket.protocol = endpoint.protocol === 'https:' ? 'wss:' : 'ws:';

  // Browsers cannot set headers on a WebSocket, so the token goes in connection_init: the
  // headers of the editor as they were for the operation that opened the socket. The socket
  // closes when its last subscription ends, so edited headers apply to the next one.
  let headers = {};
  const wsClient = graphqlWs.createClient({
    url: socket.href,
    lazy: true,
    connectionParams: () => headers,
  });
  const send = GraphiQL.createFetcher({ url: endpoint.href, wsClient });
  const fetcher = (params, options) => {
    headers = (options && options.headers) || {};
    return send(params, options);
  };
  const defaultQuery = `# Orderly's GraphQL API. Every answer to a query carries
# extensions.consistency { token stale lagMs }: how fresh the read models are.
# Put a token in the headers below: {"Authorization": "Bearer <JWT>"}.
{
  products(first: 5) {
    nodes { sku name available price { amountMinor currency } }
  }
}
`;
  ReactDOM.createRoot(root).render(
    React.createElement(GraphiQL, {
      fetcher,
      defaultQuery,
      defaultEditorToolsVisibility: 'headers',
      shouldPersistHeaders: true,
    }),
  );
})();
