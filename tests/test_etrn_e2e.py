"""ETRN over a real socket: trusted clients start the queue for a domain, others get 459."""

from __future__ import annotations

from smtpwire import Wire


def test_etrn_trusted_and_untrusted(make_server):
    trusted = make_server()
    w = Wire(trusted.port)
    code, lines = (w.send(b"EHLO c.example\r\n"), w.reply())[1]
    assert "ETRN" in lines
    code, text = w.cmd("ETRN example.org")
    assert code == 250 and text.startswith("2.0.0 Queuing started for example.org")
    assert "ETRN example.org from localhost[127.0.0.1]" in trusted.log_text()

    untrusted = make_server(server_toml="trusted_networks = []")
    w = Wire(untrusted.port)
    w.cmd("EHLO c.example")
    assert w.cmd("ETRN example.org") == (459, "4.7.1 Error: ETRN not allowed from this client")
