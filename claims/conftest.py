# The claims run through avprobe's pytest plugin, loaded by the checkout's root conftest.py
# (see avprobe/pytest_plugin.py).
