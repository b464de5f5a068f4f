"""The HTTP front: relayd's listening sockets and everything that speaks HTTP
or WebSocket on them.

- :mod:`.server`: the server loop, Hypercorn's trio worker with relayd's
  fixes, which hands some connections to relayd's own loops;
- :mod:`.sockets`: the leaf those loops share: reads and writes with
  deadlines, the head limit, the hand-over protocol;
- :mod:`.http1` and :mod:`.ask_wire`: plain ``POST /api/ask`` parsed without
  h11 and served on its own keep-alive loop;
- :mod:`.agent_upgrade`, :mod:`.websocket_wire` and :mod:`.agent_endpoint`:
  an agent's WebSocket upgrade, its frames on the socket, and the endpoint
  that gives a :class:`~relayd.agents.session.AgentSession` its transport.

Import the modules themselves: this package re-exports nothing, so that the
sans-I/O parsers (:mod:`.http1`, :mod:`.agent_upgrade`) load neither Trio nor
Hypercorn.
"""
