"""Deliberately broken Python workers, for the test that the conformance
suite catches them (tests/tests/conformance.rs).

    python broken_worker.py ack-first  --nats URL --id ID ...   acks a command when it arrives, before running it
    python broken_worker.py forgetful  --nats URL --id ID ...   remembers nothing and trains differently every time
    python broken_worker.py unchecked  --nats URL --id ID ...   publishes whatever tensors its trainer returns

The rest of the command line is flame-py-worker's.
"""

import sys

import numpy as np

from flame_sdk import cli
from flame_sdk.protocol import Command, ProtocolError
from flame_sdk.worker import Worker


class AckFirst(Worker):
    async def handle(self, msg):
        await msg.ack()  # wrong: a crash now loses the command
        try:
            command = Command.decode(msg.data)
        except ProtocolError:
            return
        report = await self.execute(command)
        await self.send_report(report)

    async def ack(self, msg):
        pass


class Forgetful(Worker):
    def remember(self, command_id, report):
        pass  # wrong: a repeat runs again

    async def _train(self, c, b):
        body = dict(c.body)
        body["seed"] = int(np.random.default_rng().integers(1 << 30))  # and never the same way twice
        return await super()._train(c, body)


def unchecked():
    import flame_sdk.weights as w

    # wrong: the trainer's tensors go out as they are, without the check against the global model
    w.conform = lambda like, tensors, who="": w.Model({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}, list(like.buffers))
    return Worker


def main():
    how, argv = sys.argv[1], sys.argv[2:]
    if how == "unchecked":
        cli.Worker = unchecked()
        cli.main(argv)
        return
    cls = {"ack-first": AckFirst, "forgetful": Forgetful}[how]
    cli.Worker = cls  # flame-py-worker's main, with the broken class
    cli.main(argv)


if __name__ == "__main__":
    main()
