"""avprobe: do audio-visual LLMs really hear, or do they guess sounds from what they see?"""

__version__ = "0.1.0"
# Bumped whenever a change to the engine or probes changes stored results: part of every cache key.
ENGINE_VERSION = "1"
