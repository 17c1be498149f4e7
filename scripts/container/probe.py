"""An operator client that waits for the gateway to go away and reports how it went.

    probe.py URL OUT_FILE      (the operator token in the environment: PROBE_TOKEN)

Connects to the gateway WebSocket (the token both as the upgrade's bearer and in
`connect`), completes the handshake, prints `ready` on stdout, then reads frames until the
server closes the socket. It writes to OUT_FILE, as JSON: every event name it received, the
payload of the `shutdown` event (or null) and the close code and reason (or null when the
connection dropped without a close frame). scripts/container-test.sh uses it to prove that
stopping the container tells clients `shutdown` and closes with 1012.
"""

import asyncio
import json
import os
import sys

import websockets


async def main(url: str, out_file: str) -> int:
    token = os.environ["PROBE_TOKEN"]
    headers = {"Authorization": f"Bearer {token}"}
    async with websockets.connect(url, additional_headers=headers, open_timeout=10) as ws:
        challenge = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if challenge.get("event") != "connect.challenge":
            print(f"expected connect.challenge, got {challenge}", file=sys.stderr)
            return 1
        connect = {
            "type": "req",
            "id": "probe-1",
            "method": "connect",
            "params": {
                "protocol": 1,
                "role": "operator",
                "token": token,
                "client": {"name": "container-probe", "version": "1"},
            },
        }
        await ws.send(json.dumps(connect))
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if hello.get("type") != "res" or not hello.get("ok"):
            print(f"connect failed: {hello}", file=sys.stderr)
            return 1
        print("ready", flush=True)

        events, shutdown = [], None
        try:
            async for message in ws:
                frame = json.loads(message)
                if frame.get("type") == "event":
                    events.append(frame["event"])
                    if frame["event"] == "shutdown":
                        shutdown = frame.get("payload")
        except websockets.ConnectionClosed:
            pass
        close = ws.close_code, ws.close_reason
    with open(out_file, "w", encoding="utf-8") as out:
        json.dump(
            {"events": events, "shutdown": shutdown, "close_code": close[0], "close_reason": close[1]},
            out,
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2])))
