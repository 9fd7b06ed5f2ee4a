"""`avprobe inputs`: what a model will see for one clip, to hold against the upstream processor.

    avprobe inputs clip.mp4 --model qwen2.5-omni-3b --json
    avprobe inputs video.mp4 --audio other.wav --model organism

The settings that change inputs (the prompt layout among them) and where they come from, frame
indices (and the rule that picked them), the video grid and seconds per grid, token counts per
role, the role runs in prompt order, the rotary position range per role, and the prompt text
around the media. Loads the model's weights (the adapter builds inputs with its
own processor and positions); nothing is run.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def describe_inputs(adapter: Any, sample: Any, query: str) -> dict[str, Any]:
    """The layout of one sample's prompt under `adapter` (JSON-able)."""
    import numpy as np

    from avprobe.media.sources import load_sample_media
    from avprobe.types import Role

    s = adapter.settings
    media = load_sample_media(sample, fps=s.fps, max_frames=s.max_frames, frame_rule=s.frame_rule)
    mi = adapter.build_inputs(media, query)
    roles = mi.roles[: mi.prompt_len].numpy()
    # [axes, P] whatever the family's layout (Qwen M-RoPE [3, 1, P], Gemma [1, P])
    pos = mi.positions.reshape(-1, mi.positions.shape[-1])[:, : mi.prompt_len].numpy()
    out: dict[str, Any] = {"model": adapter.name, "query": query, "prompt_len": int(mi.prompt_len),
                           "settings": s.inputs_view(),
                           "settings_source": getattr(adapter, "settings_source", "")}
    if sample.video is not None:
        from avprobe.media.decode import probe_video, sample_indices

        total, rate = probe_video(sample.video)
        idx = sample_indices(total, rate, s.fps, s.max_frames, rule=s.frame_rule)
        out["video"] = {"source_frames": int(total), "source_fps": float(rate), "frame_indices": idx.tolist()}
    if media.frames is not None:
        out.setdefault("video", {})["frames"] = int(media.frames.shape[0])
    if media.waveform is not None:
        out["audio"] = {"seconds": round(len(media.waveform) / media.sample_rate, 4)}
    for key in ("video_grid_thw", "video_second_per_grid", "feature_attention_mask"):
        v = mi.inputs.get(key)
        if v is None:
            continue
        if key == "feature_attention_mask":
            out.setdefault("audio", {})["feature_frames"] = int(v.sum())
        else:
            out[key] = np.asarray(v).tolist()
    out["tokens_per_role"] = {r.label: int((roles == int(r)).sum()) for r in Role if (roles == int(r)).any()}
    runs: list[dict[str, Any]] = []
    for i, r in enumerate(roles.tolist()):
        if runs and runs[-1]["role"] == Role(r).label:
            runs[-1]["end"] = i
            runs[-1]["tokens"] += 1
        else:
            runs.append({"role": Role(r).label, "start": i, "end": i, "tokens": 1})
    out["role_runs"] = runs
    out["positions_per_role"] = {
        Role(r).label: {"min": pos[:, roles == r].min(axis=1).tolist(), "max": pos[:, roles == r].max(axis=1).tolist()}
        for r in sorted(set(roles.tolist()))}
    # the prompt text, media runs collapsed to one marker each
    ids = mi.input_ids[0, : mi.prompt_len].tolist()
    parts: list[str] = []
    i = 0
    tok = adapter.tokenizer
    while i < len(ids):
        r = Role(int(roles[i]))
        j = i
        while j < len(ids) and int(roles[j]) == int(r):
            j += 1
        if r in (Role.VIDEO, Role.AUDIO, Role.IMAGE):
            parts.append(f"<{r.label} x{j - i}>")
        else:
            parts.append(tok.decode(ids[i:j]))
        i = j
    out["prompt"] = "".join(parts)
    return out


def _cmd(args: argparse.Namespace) -> int:
    from avprobe.adapters import load
    from avprobe.records import DEFAULT_QUERY
    from avprobe.types import Sample

    for p in (args.clip, args.audio):
        if p is not None and not Path(p).is_file():
            log.error("%s: no such file", p)
            return 2
    try:
        adapter = load(args.model, dtype=args.dtype, local_files_only=not args.allow_download)
        query = args.query or (adapter.settings.queries or (DEFAULT_QUERY,))[0]
        audio_only = Path(args.clip).suffix.lower() in (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac")
        sample = (Sample(id=Path(args.clip).stem, audio=str(args.clip)) if audio_only else
                  Sample(id=Path(args.clip).stem, video=str(args.clip), audio=args.audio))
        info = describe_inputs(adapter, sample, query)
    except (ValueError, FileNotFoundError, OSError) as exc:
        log.error("%s", exc)
        return 2
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]{info['model']}[/]: {info['prompt_len']} prompt tokens")
    con.print(f"settings ({info['settings_source']}): {info['settings']}")
    for k in ("video", "audio", "video_grid_thw", "video_second_per_grid", "tokens_per_role"):
        if k in info:
            con.print(f"{k}: {info[k]}")
    t = Table(title="role runs (prompt order)")
    for c in ("role", "start", "end", "tokens"):
        t.add_column(c)
    for r in info["role_runs"]:
        t.add_row(r["role"], str(r["start"]), str(r["end"]), str(r["tokens"]))
    con.print(t)
    con.print(f"rotary positions per role (min / max per axis): {info['positions_per_role']}")
    con.print(f"prompt: {info['prompt']!r}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inputs", help="what a model will see for one clip (layout, grids, positions)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("clip", type=Path, help="a video (with its audio track) or an audio file")
    p.add_argument("--audio", metavar="FILE", help="audio from this file instead of the clip's track")
    p.add_argument("--model", required=True, help="alias, HF id or local directory")
    p.add_argument("--query", help="the prompt's question (default: the model's first query)")
    p.add_argument("--dtype", default="auto", help="torch dtype of the processor inputs (default auto)")
    p.add_argument("--allow-download", dest="allow_download", action="store_true",
                   help="let transformers download a missing config or processor")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd)
