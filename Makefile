# relayd: quick start and tests.
#
#   make run     install into .venv and run relayd in the foreground on
#                127.0.0.1:2525 with etc/relayd.local.yaml (no root needed)
#   make test    install relayd with its test extras into .venv and run the
#                whole test suite (unit + integration); this is what CI runs
#   make clean   remove build artifacts and caches (keeps .venv and var/)
#
# Both targets install relayd non-editably: twistd finds the relayd plugin
# in site-packages, as it will on a server, and the integration tests run
# that installed copy (unit tests import the source tree).

PYTHON ?= python3
VENV   ?= .venv
CONFIG ?= etc/relayd.local.yaml

VPY   := $(VENV)/bin/python
PIP   := $(VPY) -m pip --disable-pip-version-check --no-input
QUIET := --quiet
# Twisted rescans (and tries to rewrite) its plugin cache whenever it is
# stale; wheels never regenerate it, so do it once after every install.
# -I keeps the source tree's twisted/plugins out of the scan.
PLUGIN_CACHE := $(VPY) -I -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

.PHONY: run test install install-test clean

$(VPY):
	$(PYTHON) -m venv $(VENV)

# A stale build/ directory can put deleted modules back into the wheel.
install: $(VPY)
	rm -rf build
	$(PIP) install $(QUIET) .
	$(PIP) install $(QUIET) --force-reinstall --no-deps .
	$(PLUGIN_CACHE)

install-test: $(VPY)
	rm -rf build
	$(PIP) install $(QUIET) '.[test]'
	$(PIP) install $(QUIET) --force-reinstall --no-deps .
	$(PLUGIN_CACHE)

run: install
	mkdir -p var/spool
	@echo "relayd: see the queue from another terminal with: $(VENV)/bin/relayctl -c $(CONFIG) list"
	exec $(VENV)/bin/twistd -n --pidfile= relayd --config $(CONFIG)

test: install-test
	$(VPY) -m pytest -q tests

clean:
	rm -rf build dist *.egg-info .pytest_cache
	rm -f twisted/plugins/dropin.cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
