"""A ZeroMQ proxy in front of a real server, in the test process, that may rewrite its replies:
how the tests play a lying server."""
from __future__ import annotations

import threading

import zmq


class RewritingProxy:
    """Forwards every request to the server at `server_url`; each reply passes `_rewrite` (its
    frames after the envelope's delimiter). Subclasses set their fields before calling this
    __init__, which starts the forwarding thread."""

    def __init__(self, server_url: str):
        ctx = zmq.Context.instance()
        self.front = ctx.socket(zmq.ROUTER)
        self.front.bind("tcp://127.0.0.1:*")
        self.url = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.back = ctx.socket(zmq.DEALER)
        self.back.connect(server_url)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        client = None
        while not self.stop.is_set():
            events = dict(poller.poll(50))
            if self.front in events:
                client, *msg = self.front.recv_multipart()
                self.back.send_multipart(msg)
            if self.back in events:
                reply = self.back.recv_multipart()
                self.front.send_multipart([client, b"", *self._rewrite(reply[1:])])

    def _rewrite(self, reply: list) -> list:
        return reply

    def close(self):
        self.stop.set()
        self.thread.join()
        self.front.close(0)
        self.back.close(0)
