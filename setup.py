"""
Build in a scratch directory, never in the checkout: setuptools would
otherwise leave build/ and relayd.egg-info/ behind after every
``pip install .`` (root-owned when root installs), and a stale build/lib
puts modules deleted since back into the next wheel. All metadata is in
setup.cfg.
"""

import atexit
import shutil
import tempfile

from setuptools import setup

scratch = tempfile.mkdtemp(prefix="relayd-build-")
atexit.register(shutil.rmtree, scratch, True)
setup(options={"build": {"build_base": scratch}, "egg_info": {"egg_base": scratch}})
