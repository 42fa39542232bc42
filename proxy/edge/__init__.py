"""The proxy's hot path: one request's journey, one short module per stage.

``pipeline.proxy_handle`` runs them in order:

- ``ingress``: what the front doors (``proxy/asgi.py``, ``proxy/views.py``) read of a request and write of an
  answer: the presented key, the body limit, the request id, the response headers;
- ``authenticate``: the key's cached verification, and whether it may use the model asked for;
- ``admit``: whether the request may go ahead now (empty today: rate limits and budgets go here);
- ``payload``: the body's validation (``endpoints`` says which fields each endpoint needs);
- ``pick``: which deployment answers, and the fallback models after it;
- ``send``: the one upstream call, through the backend of the upstream's kind (``backends``);
- ``relay``: the answer passed on, a stream event by event, noting the usage;
- ``account``: the usage event handed off the request path.

Hot-path rules: no ORM, no sync I/O, no per-request logging, orjson only. An import-linter contract keeps
DRF, models modules, services, APIs and admin out of this package.
"""
