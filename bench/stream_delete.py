"""What removing one JetStream message costs, with and without the server's secure erase.

nats-py's `js.delete_msg` sends STREAM.MSG.DELETE without `no_erase`, so nats-server overwrites
the message in its file store before removing it; `ratefleet.runtime.streams.delete_message`
sends `no_erase: true` (a cancelled gateway batch's queued jobs, a replayed dead letter).
One embedded nats-server, a file-store work-queue stream, messages of ~330 bytes, deleted one at
a time (each a request and its answer), then read one at a time with `get_msg` for scale.
Prints µs per operation; writes bench/results/stream_delete.json.
Run: .venv/bin/python bench/stream_delete.py [--messages N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import nats

from ratefleet.runtime.embedded import EmbeddedNats
from ratefleet.runtime.streams import delete_message

OUT = Path(__file__).parent / "results" / "stream_delete.json"


async def measure(messages: int, rounds: int) -> list[dict]:
    server = EmbeddedNats(Path(tempfile.mkdtemp(prefix="ratefleet-bench-")) / "nats").start()
    nc = await nats.connect(server.url)
    rows = []
    try:
        js = nc.jetstream()
        await js.add_stream(name="BENCH", subjects=["bench.>"], retention="workqueue")
        body = b'{"batch":"B","x":"' + b"y" * 300 + b'"}'
        ops = {"delete_msg (nats-py, erases)": lambda seq: js.delete_msg("BENCH", seq),
               "delete_message (no_erase)": lambda seq: delete_message(js, "BENCH", seq),
               "get_msg (for scale)": lambda seq: js.get_msg("BENCH", seq)}
        for round_ in range(1, rounds + 1):
            for name, op in ops.items():
                acks = await asyncio.gather(*(js.publish("bench.x", body) for _ in range(messages)))
                started = time.perf_counter()
                for ack in acks:
                    await op(ack.seq)
                took = time.perf_counter() - started
                rows.append({"round": round_, "operation": name, "messages": messages,
                             "us_each": round(took / messages * 1e6, 1)})
                await js.purge_stream("BENCH")
    finally:
        await nc.close()
        server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = asyncio.run(measure(args.messages, args.rounds))
    print(f"{'round':>5}  {'operation':<32} {'messages':>8}  {'µs each':>9}")
    for row in rows:
        print(f"{row['round']:>5}  {row['operation']:<32} {row['messages']:>8}  {row['us_each']:>9.1f}")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
