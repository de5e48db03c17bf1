import socket

from bus.ports import _ephemeral_start, free_port


def test_free_ports_are_listenable_and_outside_the_ephemeral_range():
    start = _ephemeral_start()
    ports = {free_port() for _ in range(20)}
    assert all(p < start for p in ports), (start, sorted(ports))
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
            s.listen()


def test_a_port_in_use_is_skipped(monkeypatch):
    import bus.ports
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        taken = held.getsockname()[1]
        other = free_port()
        picks = iter([taken, taken, other])
        monkeypatch.setattr(bus.ports.random, "randrange", lambda lo, hi: next(picks))
        assert free_port() == other


def test_no_room_below_the_ephemeral_range_falls_back_to_the_kernel(monkeypatch):
    import bus.ports
    monkeypatch.setattr(bus.ports, "_ephemeral_start", lambda: 1024)
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
