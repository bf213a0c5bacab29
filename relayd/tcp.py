"""
Socket options every TCP connection of relayd gets, accepted or made.

Nagle's algorithm holds back a short segment (a reply, a message's final
dot) until the peer acknowledges the previous one, and the peer delays
that acknowledgement by up to 40 ms: every SMTP round trip would wait for
it. relayd writes whole replies and whole body chunks, so it never needs
Nagle to coalesce small writes for it.
"""

from __future__ import annotations


def setNoDelay(transport) -> None:
    """
    TCP_NODELAY on ``transport``'s socket. TLS and PROXY-protocol wrappers
    pass the call on to the TCP transport beneath; a transport that is not
    TCP (a UNIX socket listener) has no such option and is left as it is.
    """
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is None:
        return
    try:
        setter(True)
    except OSError:
        pass  # AF_UNIX: the option does not exist there
