"""Where a sample's media come from: its files, or a registered renderer of in-memory media.

A sample that names a video or audio file is decoded from that file (`load_media`), whatever
else it carries: an organism manifest written with `--mp4` decodes the mp4s it names. A
sample without files carries a `media_key` whose scheme (the part before the first ':')
names the renderer that regenerates its media, e.g. the organism world's
``organism-v1:...``. Renderers register themselves (`register_renderer`) when their module
is imported; `KNOWN_RENDERERS` lets a sample read back from a manifest find its renderer's
module without the caller importing it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from avprobe.types import Media, Sample

Renderer = Callable[[Sample], Media]

_RENDERERS: dict[str, Renderer] = {}
# scheme prefix -> module that registers its renderer on import (imported on first use)
KNOWN_RENDERERS = {"organism-": "avprobe.organism.world"}


def register_renderer(scheme: str, render: Renderer) -> None:
    """Make `render(sample)` the source of samples whose media_key starts with ``scheme:``."""
    _RENDERERS[scheme] = render


def renderer_for(sample: Sample) -> Renderer:
    scheme = (sample.media_key or "").split(":", 1)[0]
    if scheme not in _RENDERERS:
        module = next((m for prefix, m in KNOWN_RENDERERS.items() if scheme.startswith(prefix)), None)
        if module is not None:
            importlib.import_module(module)
    try:
        return _RENDERERS[scheme]
    except KeyError:
        raise ValueError(
            f"sample {sample.id!r} holds in-memory media of source {scheme!r}, and no renderer is registered "
            f"for it (known: {', '.join(sorted(_RENDERERS)) or 'none'}); give the sample a video or audio file"
        ) from None


def load_sample_media(sample: Sample, fps: float | None = None, max_frames: int | None = None,
                      frame_rule: str | None = None) -> Media:
    """The decoded media of one sample: from its files (frames picked by `frame_rule`, see
    `avprobe.media.decode`), else from its renderer."""
    if sample.video is not None or sample.audio is not None:
        from avprobe.media.decode import load_media

        kw = {k: v for k, v in (("fps", fps), ("max_frames", max_frames), ("frame_rule", frame_rule))
              if v is not None}
        return load_media(sample, **kw)
    if sample.media_key:
        return renderer_for(sample)(sample)
    raise ValueError(f"sample {sample.id!r} names neither a video nor an audio file")
