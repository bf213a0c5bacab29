"""Only trusted clients may relay; everyone else is refused at RCPT."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_untrusted_client_is_refused_at_rcpt(sink, startRelayd):
    # 127.0.0.1 is outside the only trusted network, so this client is untrusted.
    daemon = startRelayd(sink.port, trustedNetworks=["10.9.8.0/24"])
    with daemon.connect() as client:
        assert client.ehlo()[0] == 250
        code, reply = client.mail("mallory@client.test")
        assert code == 250, reply
        code, reply = client.rcpt("victim@remote.test")
        assert (code, reply) == (554, b"5.7.1 <victim@remote.test>: Relay access denied")
    # Postfix's wording; the id is NOQUEUE or the transaction's queue id.
    daemon.waitForLog(r"\b(?:NOQUEUE|[0-9A-Z]{16}): reject: RCPT from [^\s\[]*\[127\.0\.0\.1\]: 554 5\.7\.1 ")
    assert sink.messages() == []
