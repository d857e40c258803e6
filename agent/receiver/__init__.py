"""The reference central endpoint: the delivery contract (docs/delivery.md) as running code.

``edge-agent receiver --listen HOST:PORT --db FILE [--print]`` serves it; the demo and the tests
use it, and integrators can read it as the contract's executable example. One job per module:

- ``endpoint``: ``Receiver``, the HTTP side: routes, answers (201/409/400, 207 per batch item,
  413/415), the worker threads, fault injection (``receiver.faults``).
- ``contract``: what is accepted: media types, limits, the per-item verdict, splitting a batch
  body into its items' own JSON texts, the ``Faults`` knobs.
- ``store``: the SQLite file, events deduplicated by ``(source, id)``, each new one committed
  before it is answered, every duplicate counted.
- ``serve``: the command's runner (signals, ``--print`` echo, exit codes).
"""

from agent.receiver.contract import CE_BATCH, CE_SINGLE, MAX_BATCH_EVENTS, Faults
from agent.receiver.endpoint import KEEP_REQUESTS, Receiver, SeenRequest
from agent.receiver.serve import run_receiver, serve_receiver

__all__ = ["CE_BATCH", "CE_SINGLE", "KEEP_REQUESTS", "MAX_BATCH_EVENTS", "Faults", "Receiver",
           "SeenRequest", "run_receiver", "serve_receiver"]
