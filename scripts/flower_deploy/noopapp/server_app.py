"""A ServerApp that times rounds: each round sends the same small model (the
size of the digits MLP of the Flame job, 64x32 + 32 + 32x10 + 10 float32) to
every SuperNode and waits for every reply. Prints one line per round:
`flower_round=R ms=M replies=K`, and appends it to the run config's
`out-file` where one is set (the bench reads that file: `flwr run --stream`
may lose its log stream under load while the rounds go on)."""

import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    nodes = int(context.run_config["num-nodes"])
    out_file = str(context.run_config.get("out-file", ""))
    while True:
        ids = list(grid.get_node_ids())
        if len(ids) >= nodes:
            break
        time.sleep(0.5)
    rng = np.random.default_rng(0)
    arrays = ArrayRecord([rng.standard_normal(s).astype(np.float32) for s in [(32, 64), (32,), (10, 32), (10,)]])
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        messages = [
            Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"round": r})}), dst_node_id=n, message_type=MessageType.TRAIN)
            for n in ids
        ]
        replies = list(grid.send_and_receive(messages))
        ok = sum(1 for m in replies if m.has_content())
        line = f"flower_round={r} ms={1000 * (time.perf_counter() - start):.0f} replies={ok}"
        print(line, flush=True)
        if out_file:
            with open(out_file, "a") as f:
                f.write(line + "\n")
