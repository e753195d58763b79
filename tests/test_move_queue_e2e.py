"""The README's promise for a dead node: its queue/ copied into another node's spool is delivered there."""

from __future__ import annotations

import shutil

from conftest import BACKEND_TOML, free_port, routes_toml, wait_for_log
from test_queue_rm_e2e import send

#: the first node cannot deliver remote.test (its next hop is down): the mail waits in its
#: queue, next tried a second later (a moved message keeps its next retry time)
STUCK_TOML = """
[queue]
retry_initial = 1
retry_max = 1
""" + BACKEND_TOML + """
[backends.out]
use = "smarthost"
host = "127.0.0.1:{port}"
tls = "none"
""" + routes_toml(("example.test", "local"), ("*", "out"))


def test_a_stopped_nodes_queue_is_delivered_by_the_node_it_was_copied_to(make_server):
    dead = make_server(STUCK_TOML.replace("{port}", str(free_port())))
    qids = [send(dead, f"user{n}@remote.test") for n in range(3)]
    for qid in qids:
        wait_for_log(dead, rf"{qid}: to=<user\d@remote\.test>.*status=deferred")
    dead.stop()
    # the other node has the same backend names (a queued recipient keeps the backend it was
    # routed to); here its "out" stores the mail, standing for a next hop that is up
    other = make_server(BACKEND_TOML + '[backends.out]\nuse = "maildir"\nbase = "mail"\n'
                        + routes_toml(("example.test", "local"), ("*", "out")), start=False)
    other.start()
    other.stop()
    for path in (dead.spool / "queue").iterdir():
        shutil.copy2(path, other.spool / "queue" / path.name)
    other.start()
    for n in range(3):
        assert len(other.delivered(f"user{n}@remote.test", timeout=20)) == 1
    for qid in qids:
        wait_for_log(other, rf"{qid}: removed")
