# The avprobe pytest plugin is registered through the pytest11 entry point (pyproject.toml);
# nothing else belongs here.
