# Claims run through the avprobe pytest plugin (registered by the package); see avprobe/pytest_plugin.py.
