"""
``testConfig``: a real ``relayd.config.Config``, read by the real parser, for
unit tests. Give only what a test is about; the rest is a small valid config.
"""

from __future__ import annotations

from typing import Any

import yaml

from relayd import config

# The smallest config the parser accepts, with a smarthost so that routing
# is settled; each section a test names is merged over its entry here.
BASE: dict[str, Any] = {
    "hostname": "relay.test",
    "listeners": [{"endpoint": "tcp:2525", "tls": "none", "auth": "none"}],
    "queue": {"directory": "/var/spool/relayd"},
    "delivery": {"smarthosts": [{"host": "smtp.test", "tls": "none"}]},
}


def testConfig(path: str = "/etc/relayd/relayd.yaml", **sections: Any) -> config.Config:
    """
    The config ``BASE`` with ``sections`` given as YAML values (durations as
    "5m", sizes as "10MB"): a mapping is merged over the base section of
    that name, anything else replaces it, and None leaves the key out.
    """
    tree = {key: dict(value) if isinstance(value, dict) else value for key, value in BASE.items()}
    for key, value in sections.items():
        if value is None:
            tree.pop(key, None)
        elif isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return config.parse(yaml.safe_dump(tree, sort_keys=False), path)


# Not a test for pytest to collect.
testConfig.__test__ = False  # type: ignore[attr-defined]
