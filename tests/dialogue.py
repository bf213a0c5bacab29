"""What the SMTP dialogue tests share: feed bytes to a session, read its replies."""

from __future__ import annotations


class Dialogue:
    """Mixed into a test harness that has ``proto`` (a session) and ``transport`` (a StringTransport)."""

    def send(self, data: bytes) -> list[str]:
        """Feed bytes as one read; the reply lines the session wrote since the last look."""
        self.proto.dataReceived(data)
        return self.take()

    def take(self) -> list[str]:
        out = self.transport.value().decode()
        self.transport.clear()
        return [line for line in out.split("\r\n") if line]
