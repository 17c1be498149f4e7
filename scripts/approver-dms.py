#!/usr/bin/env python3
"""Counts the DMs one approver gets for one approvals.request when three accounts list them,
and again after the notifying account's client (alpha) is killed twice: the before/after
figure of issue 14, for any warden binary. Needs a Synapse as the tests use it
(SYNAPSE_TEST_URL, SYNAPSE_TEST_SHARED_SECRET; scripts/synapse.sh start DIR). Works in
/tmp/dmcount/<label><n>/.

    scripts/approver-dms.py target/debug/warden after
"""
import hashlib, hmac, json, os, subprocess, sys, time, urllib.request, urllib.parse, random, socket, signal

BIN, LABEL = sys.argv[1], sys.argv[2]
HS = os.environ["SYNAPSE_TEST_URL"]
SECRET = os.environ["SYNAPSE_TEST_SHARED_SECRET"]
run = f"{LABEL}{random.randrange(1<<30):x}"
work = f"/tmp/dmcount/{run}"
os.makedirs(work)

def req(method, url, body=None, token=None):
    data = json.dumps(body).encode() if body is not None else None
    r = urllib.request.Request(url, data=data, method=method)
    r.add_header("Content-Type", "application/json")
    if token: r.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(r, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")

def register(name):
    ep = f"{HS}/_synapse/admin/v1/register"
    _, n = req("GET", ep)
    user, pw = f"{name}{run}", f"pw-{name}{run}"
    mac = hmac.new(SECRET.encode(), b"\0".join([n["nonce"].encode(), user.encode(), pw.encode(), b"notadmin"]), hashlib.sha1).hexdigest()
    st, r = req("POST", ep, {"nonce": n["nonce"], "username": user, "password": pw, "admin": False, "mac": mac})
    assert st == 200, r
    return {"user_id": r["user_id"], "token": r["access_token"], "password": pw}

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

bots = {a: register(f"dm{a}") for a in ["alpha", "beta", "gamma"]}
owner = register("dmowner")
gw, admin = free_port(), free_port()
TOKEN = "dmcount-token"
cfg = f'[gateway]\nbind = "127.0.0.1:{gw}"\ntoken = "{TOKEN}"\nallow_unlisted_nodes = true\n[admin]\nbind = "127.0.0.1:{admin}"\n[state]\ndir = "{work}/state"\n'
for a, b in bots.items():
    cfg += f'[matrix.accounts.{a}]\nhomeserver = "{HS}"\nuser_id = "{b["user_id"]}"\npassword = "{b["password"]}"\nallowed_senders = ["{owner["user_id"]}"]\napprovals = {{ enabled = true, approvers = ["{owner["user_id"]}"] }}\n'
open(f"{work}/warden.toml", "w").write(cfg)
node_cfg = f'[node]\nname = "dmnode"\ngateway_url = "ws://127.0.0.1:{gw}/ws"\ntoken = "{TOKEN}"\n[node.commands.hello]\nargv = ["echo", "hi"]\napproval = true\n[admin]\nbind = "127.0.0.1:{free_port()}"\n'
open(f"{work}/node.toml", "w").write(node_cfg)
env = {k: v for k, v in os.environ.items() if not k.startswith("WARDEN_")}
log = open(f"{work}/warden.log", "w")
w = subprocess.Popen([BIN, "--config", f"{work}/warden.toml", "run"], stdout=log, stderr=log, env=env)
n = subprocess.Popen([BIN, "--config", f"{work}/node.toml", "node"], stdout=open(f"{work}/node.log", "w"), stderr=subprocess.STDOUT, env=env)

def wait(cond, what, within=60):
    end = time.time() + within
    while time.time() < end:
        v = cond()
        if v: return v
        time.sleep(0.2)
    raise SystemExit(f"timeout: {what}")

def tree_node(path):
    try:
        st, t = req("GET", f"http://127.0.0.1:{admin}/admin/tree")
    except Exception:
        return None
    def find(n):
        if n.get("path") == path: return n
        for c in n.get("children", []) or []:
            f = find(c)
            if f: return f
    return find(t.get("root", t)) if isinstance(t, dict) else None

for a in bots:
    wait(lambda: (tree_node(f"root/channels/matrix/{a}/client") or {}).get("ready"), f"{a} ready")
    wait(lambda: (tree_node(f"root/channels/matrix/{a}/approvals") or {}).get("ready"), f"{a} handler")
time.sleep(2)  # the node connects
call = subprocess.Popen([BIN, "call", "--gateway", f"ws://127.0.0.1:{gw}/ws", "--token", TOKEN, "--timeout", "120", "approvals.request",
                         "--params", json.dumps({"node": "dmnode", "command": "hello", "reason": "count", "timeout_s": 120})],
                        stdout=open(f"{work}/call.log", "w"), stderr=subprocess.STDOUT, env=env)

def counts():
    st, s = req("GET", f"{HS}/_matrix/client/v3/sync?timeout=0", token=owner["token"])
    for rid in (s.get("rooms", {}).get("invite", {}) or {}):
        req("POST", f"{HS}/_matrix/client/v3/rooms/{urllib.parse.quote(rid)}/join", {}, owner["token"])
    st, j = req("GET", f"{HS}/_matrix/client/v3/joined_rooms", token=owner["token"])
    rooms, msgs = 0, 0
    ids = {b["user_id"] for b in bots.values()}
    for rid in j.get("joined_rooms", []):
        st, m = req("GET", f"{HS}/_matrix/client/v3/rooms/{urllib.parse.quote(rid)}/messages?dir=b&limit=200", token=owner["token"])
        c = sum(1 for e in m.get("chunk", []) if e.get("sender") in ids and e.get("type") in ("m.room.message", "m.room.encrypted"))
        if c: rooms += 1; msgs += c
    return rooms, msgs

time.sleep(10)
first = counts()
print(f"{LABEL}: after one request: {first[0]} DM rooms, {first[1]} messages", flush=True)
for k in range(2):
    gen = tree_node("root/channels/matrix/alpha/client")["generation"]
    req("POST", f"http://127.0.0.1:{admin}/admin/actors/root/channels/matrix/alpha/client/kill", {})
    wait(lambda: (lambda n: n and n.get("generation", 0) > gen and n.get("ready"))(tree_node("root/channels/matrix/alpha/client")), "alpha back")
    wait(lambda: (tree_node("root/channels/matrix/alpha/approvals") or {}).get("ready"), "alpha handler back")
    time.sleep(8)
second = counts()
print(f"{LABEL}: after alpha's client was killed twice: {second[0]} DM rooms, {second[1]} messages", flush=True)
for p in (call, n, w):
    p.send_signal(signal.SIGTERM)
for p in (call, n, w):
    try: p.wait(20)
    except Exception: p.kill()
