# The claims suite's pytest plugin is loaded here, for this checkout only: it is not a pytest11
# entry point, so installing avprobe adds no options (--model, --device, ...) to other projects'
# test runs. Run the claims from the checkout: `pytest claims/ --model ...`.
pytest_plugins = ["avprobe.pytest_plugin"]
