"""An in-process Flower grid for tests and small runs: the ServerApp and every ClientApp in one process.

No Ray and no SuperLink: messages go through Flower's protobuf serialisation (the real wire
format) and straight into `ClientApp.__call__`. A client that raises comes back as an error
reply, as in the real engines. Flower 1.42 has no public in-process grid, so this subclasses the
public `Grid` and uses two of Flower's internal helpers (`flwr.common.serde`, `TaskIdentity`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1


def _wire(msg: Message) -> Message:
    """Serialise to protobuf bytes and back, with a fresh message id, as the transport does."""
    proto = message_to_proto(msg)
    proto.metadata.message_id = uuid.uuid4().hex
    return message_from_proto(type(proto).FromString(proto.SerializeToString()))


class InProcessGrid(Grid):
    """Delivers each message to the ClientApp of its destination node, synchronously."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            node: Context(run_id=run_id, node_id=node, node_config={"partition-id": i, "num-partitions": num_nodes},
                          state=RecordDict(), run_config={})
            for i, node in enumerate(self.node_ids)
        }
        self._replies: dict[str, Message] = {}
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            incoming = _wire(message)
            try:
                reply = self.client_app(incoming, self.contexts[incoming.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - a failing client must not stop the round
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=incoming)
            self._replies[incoming.metadata.message_id] = _wire(reply)
            ids.append(incoming.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_nodes: int, run_config: dict[str, Any] | None = None) -> None:
    """Run `server_app` against `num_nodes` in-process clients until it returns."""
    grid = InProcessGrid(client_app, num_nodes)
    context = Context(run_id=grid.run.run_id, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(), run_config=dict(run_config or {}))
    server_app(grid, context)
