"""Run manifests: the resolved config, package versions, seeds and counts, beside every output."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("ncppo", "torch", "diffusers", "transformers", "peft", "accelerate", "datasets", "safetensors", "numpy",
            "pillow", "open_clip_torch", "image-reward")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict[str, Any]:
    """Python, platform, package versions and (when torch is importable) the accelerator."""
    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "packages": package_versions()}
    try:
        import torch

        env["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover - torch always present in practice
        env["cuda"] = None
    return env


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_manifest(path: str | Path, *, command: str, config: Any = None, **fields: Any) -> Path:
    """Write `path` (JSON): command, UTC time, resolved config, environment and any extra fields."""
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    record = {"command": command, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "config": config, "environment": environment(), **fields}
    return atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
