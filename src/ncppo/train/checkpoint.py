"""Crash-safe checkpoints and outputs: a SIGKILL at any moment never loses the last good state.

A checkpoint folder `checkpoint-<step>` holds what `accelerator.save_state` writes (optimizer,
lr scheduler, RNG states; the model through the hooks below: only the LoRA weights for a LoRA
run, in peft keys for resuming and as the diffusers file `load_lora_weights(checkpoint)` reads) and
`trainer_state.json` (step, counters, history, the run's identity, and the size and SHA-256 of
every other file). A save goes:

  1. every process: `save_state` into `.tmp-checkpoint-<step>/`;
  2. main process: every file fsynced, `trainer_state.json` written last (fsynced), the folder
     renamed to `checkpoint-<step>` (the rename is the commit point) and the parent fsynced;
  3. only then are checkpoints beyond `--checkpoints-total-limit` removed, oldest first.

Every phase ends with all processes agreeing that it worked, so a full disk on one process makes
all of them stop with the same error instead of leaving the others waiting in a barrier.
`find_resume`/`load_resume` with "latest" verify the newest checkpoint against its recorded sizes and hashes
and, if it is incomplete, corrupt or fails to load, warns naming it and falls back to the one
before. Leftover `.tmp-*` folders of a killed save are removed at the next start (`clean_stale`).
Final weights are published the same way: written under a temporary name, fsynced, renamed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

from ..errors import InputError, RunError

PREFIX = "checkpoint-"
TMP = ".tmp-"
OLD = ".old-"
STATE_FILE = "trainer_state.json"
LORA_FILE = "lora_adapter.safetensors"
TEST_FAULT_ENV = "NCPPO_TEST_FAULT"

# What makes a checkpoint belong to a run: resuming with any of these changed is refused
# (unless --resume-anyway), because the data order, the optimizer state or the weights would not fit.
IDENTITY_KEYS = ("model", "vae", "revision", "variant", "finetune", "lora_rank", "lora_alpha", "lora_targets",
                 "batch_size", "gradient_accumulation_steps", "processes", "data_fingerprint", "pairs", "seed",
                 "init_lora", "reference_lora")


def warn(message: str) -> None:
    print(f"ncppo train: warning: {message}", file=sys.stderr, flush=True)


# ----- test hook --------------------------------------------------------------------------------

def test_fault(point: str, step: int) -> None:
    """TEST-ONLY fault injection; a no-op unless the environment sets NCPPO_TEST_FAULT.

    `NCPPO_TEST_FAULT=<kill|enospc>:<point>[:<step>]` makes the main process (RANK 0) SIGKILL
    itself, or fail as on a full disk, when a save reaches `point` ("save-begin", "save-state":
    after save_state, "save-written": trainer_state.json written but not renamed, "save-renamed":
    renamed but older checkpoints not yet pruned, "final-written": final weights written but not
    renamed). The crash-safety tests use it to kill at exact moments inside a save.
    """
    spec = os.environ.get(TEST_FAULT_ENV)
    if not spec or os.environ.get("RANK", "0") != "0":
        return
    action, name, *at = spec.split(":")
    if name != point or (at and int(at[0]) != step):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(test fault at {point})")


# ----- files ------------------------------------------------------------------------------------

def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (created or renamed files) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _sync_tree(folder: Path, hashes: bool = False) -> dict[str, list]:
    """fsync every file and folder under `folder`; returns {relative path: [size, sha256 or None]}."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_file(path)
            files[path.relative_to(folder).as_posix()] = [path.stat().st_size, _sha256(path) if hashes else None]
    for sub in sorted({p.parent for p in folder.rglob("*")} | {folder}, key=lambda p: -len(p.parts)):
        fsync_dir(sub)
    return files


def publish(tmp: Path, final: Path) -> None:
    """Rename the complete, fsynced `tmp` (file or folder) to `final`, replacing an old one only
    after the new one is in place. A crash in between leaves `.old-<name>`, restored by `clean_stale`."""
    from ..publish.files import follow_umask

    follow_umask(tmp)  # safetensors writes 0600; the run's files follow the umask as any other file
    old = final.with_name(f"{OLD}{final.name}")
    if final.exists():
        if old.exists():
            _remove(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(output_dir: str | Path) -> list[Path]:
    """Remove what a killed save left in `output_dir` (`.tmp-*`); put back an `.old-*` output whose
    replacement never arrived. Call on the main process before anything else writes there."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(TMP):
            _remove(path)
            removed.append(path)
        elif path.name.startswith(OLD):
            final = path.with_name(path.name[len(OLD):])
            if final.exists():
                _remove(path)
                removed.append(path)
            else:
                os.replace(path, final)
    if removed:
        fsync_dir(root)
    return removed


# ----- listing and verifying --------------------------------------------------------------------

def _step_of(path: Path) -> int | None:
    match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def set_aside_newer(output_dir: str | Path, step: int) -> list[Path]:
    """Rename the checkpoints of `output_dir` newer than `step` to `abandoned-checkpoint-N`, so that
    a later `--resume latest` continues this run, not the branch it was resumed away from. Main
    process only; returns the new names."""
    moved = []
    for path in list_checkpoints(output_dir, complete_only=False):
        if _step_of(path) > step:
            target = path.with_name(f"abandoned-{path.name}")
            n = 1
            while target.exists():
                target, n = path.with_name(f"abandoned-{n}-{path.name}"), n + 1
            os.replace(path, target)
            moved.append(target)
    if moved:
        fsync_dir(Path(output_dir))
        warn(f"resumed at step {step}: newer checkpoints set aside as {', '.join(p.name for p in moved)}")
    return moved


def list_checkpoints(output_dir: str | Path, *, complete_only: bool = True) -> list[Path]:
    """Checkpoint folders in `output_dir`, oldest first (only those with a trainer state by default)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := _step_of(p)) is not None]
    if complete_only:
        found = [(s, p) for s, p in found if (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def read_state(path: str | Path) -> dict:
    """The trainer state of checkpoint `path` (raises InputError if missing or unreadable)."""
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise InputError(f"{path}: incomplete checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{state_file}: unreadable ({err})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise InputError(f"{state_file}: not an ncppo trainer state")
    return state


def verify_checkpoint(path: str | Path, *, hashes: bool = True) -> str | None:
    """None if checkpoint `path` is complete and every file has its recorded size (and hash), else
    why not. Checkpoints from before the file list was recorded are only checked for their state."""
    path = Path(path)
    try:
        state = read_state(path)
    except InputError as err:
        return str(err).removeprefix(f"{path}: ")
    for name, (size, digest) in (state.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were saved"
        if hashes and digest and _sha256(file) != digest:
            return f"{name} does not match its saved SHA-256 (corrupt)"
    return None


# ----- run identity -----------------------------------------------------------------------------

def run_identity(config, *, processes: int, data_fingerprint: str, pairs: int) -> dict:
    """What a checkpoint must share with the run that resumes it (see IDENTITY_KEYS)."""
    values = {k: getattr(config, k, None) for k in IDENTITY_KEYS}
    values.update(processes=processes, data_fingerprint=data_fingerprint, pairs=pairs)
    values["lora_targets"] = list(values["lora_targets"] or [])
    from ..evaluate.sample import lora_sha256

    for key in ("init_lora", "reference_lora"):  # a LoRA counts by its content, not its path
        values[key] = lora_sha256(values[key])
    if config.finetune != "lora":
        values["lora_rank"] = values["lora_alpha"] = values["lora_targets"] = None
    else:
        values["lora_alpha"] = values["lora_alpha"] or values["lora_rank"]  # the alpha trained with
    return values


def identity_differences(saved: dict | None, current: dict) -> list[str]:
    """Human-readable differences between a checkpoint's run identity and this run's."""
    if not saved:
        return []
    return [f"{key} {saved.get(key)!r} there, {current.get(key)!r} now"
            for key in IDENTITY_KEYS if key in saved and saved.get(key) != current.get(key)]


# ----- the accelerate side ------------------------------------------------------------------------

def _agree(accelerator, ok: bool) -> bool:
    """True only if `ok` on every process; also a barrier."""
    if accelerator.num_processes == 1:
        return ok
    import torch

    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == 0)


def register_lora_hooks(accelerator, unet, adapter) -> None:
    """Make `save_state`/`load_state` store only the U-Net's LoRA weights, not the frozen base: `LORA_FILE`
    (peft keys, what resuming reads) and ``adapter``'s `save_lora` file (what `load_lora_weights` reads).

    Loading checks that the file holds exactly this run's LoRA keys and shapes: a LoRA that is
    missing keys would otherwise resume silently from its initialisation."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from ..lora import fit_report

    target = accelerator.unwrap_model(unet)

    def save_hook(models, weights, output_dir):
        for i, model in reversed(list(enumerate(models))):
            if accelerator.unwrap_model(model) is target:
                state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(target).items()}
                if accelerator.is_main_process:
                    save_file(state, os.path.join(output_dir, LORA_FILE))
                    adapter.save_lora(target, output_dir)
                if weights:
                    weights.pop(i)

    def load_hook(models, input_dir):
        for i, model in reversed(list(enumerate(models))):
            if accelerator.unwrap_model(model) is target:
                path = os.path.join(input_dir, LORA_FILE)
                if not os.path.isfile(path):
                    raise RunError(f"{input_dir}: no {LORA_FILE} (not a LoRA run's checkpoint?)")
                saved = load_file(path)
                expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(target).items()}
                problem = fit_report(expected, saved)
                if problem:
                    raise RunError(f"{path}: does not fit this run's LoRA: {problem}")
                set_peft_model_state_dict(target, saved)
                models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, trainer_state: dict,
                    total_limit: int | None = None) -> Path:
    """Save a resumable checkpoint atomically (see the module docstring); prune the oldest beyond
    `total_limit` only once the new one is complete. Raises RunError on every process if any
    process failed to write (e.g. a full disk), with the previous checkpoints left intact."""
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f"{TMP}{PREFIX}{step}"
    main = accelerator.is_main_process
    error: BaseException | None = None

    def phase(fn) -> None:
        nonlocal error
        if error is None:
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - a full disk surfaces as OSError, RuntimeError
                error = err          # (torch.save) or SafetensorError: stop every process alike
        if not _agree(accelerator, error is None):
            _fail()

    def _fail():
        if main:
            _remove(tmp)
        previous = [p.name for p in list_checkpoints(output_dir) if p != final]
        kept = f"; {previous[-1]} is intact" if previous else ""
        cause = f"{type(error).__name__}: {error}" if error is not None else "another process failed to write its part"
        raise RunError(f"saving {final.name} failed ({cause}){kept}") from error

    def prepare():
        test_fault("save-begin", step)
        if main:
            _remove(tmp)

    def write_state():
        accelerator.save_state(str(tmp))
        test_fault("save-state", step)

    def commit():
        if not main:
            return
        state = dict(trainer_state, files=_sync_tree(tmp, hashes=True))
        with open(tmp / STATE_FILE, "w") as fh:
            fh.write(json.dumps(state, indent=2, default=float))
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        test_fault("save-written", step)
        publish(tmp, final)
        test_fault("save-renamed", step)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)

    for fn in (prepare, write_state, commit):
        phase(fn)
    return final


def _checked_state(accelerator, path: Path, resume: str, identity: dict, anyway: bool) -> dict | None:
    """The trainer state of `path` if it verifies (else None, with a warning; an error for an
    explicit --resume) and belongs to this run (else an error unless `anyway`)."""
    explicit = resume != "latest"
    reason = verify_checkpoint(path) if accelerator.is_main_process else None
    if not _agree(accelerator, reason is None):
        reason = reason or "does not verify on the main process"
        if explicit:
            raise InputError(f"--resume {resume}: {reason}")
        warn(f"skipping {path}: {reason}")
        return None
    state = read_state(path)
    differences = identity_differences(state.get("run"), identity)
    if differences and not anyway:
        raise RunError(f"--resume {resume}: {path.name} was saved by another run ({'; '.join(differences)}); "
                       "use another --output-dir, or --resume-anyway to continue regardless")
    if differences:
        warn(f"resuming {path.name} of another run because of --resume-anyway: {'; '.join(differences)}")
    return state


def find_resume(accelerator, output_dir: str | Path, resume: str | None, identity: dict,
                anyway: bool = False) -> list[Path]:
    """The checkpoints `resume` may continue from, newest first, the first of them verified.

    `resume`: None (nothing: []), "latest" (every checkpoint folder in `output_dir`; the newest
    ones that are incomplete or corrupt are skipped with a warning naming them; a one-line note
    and [] if there is none) or a checkpoint folder (which must verify). A checkpoint of a run
    with another identity (batch size, accumulation, processes, data, model, LoRA shape, seed) is
    refused unless `anyway`. Cheap to call before the models load; `load_resume` loads.
    """
    if not resume:
        return []
    if resume == "latest":
        candidates = list(reversed(list_checkpoints(output_dir, complete_only=False)))
        if not candidates:
            accelerator.print(f"ncppo train: --resume latest: no checkpoint in {output_dir} yet; starting at step 0")
            return []
    else:
        candidates = [Path(resume)]
        if not candidates[0].is_dir():
            raise InputError(f"--resume {resume}: no such checkpoint folder")
    for i, path in enumerate(candidates):
        if _checked_state(accelerator, path, resume, identity, anyway) is not None:
            return candidates[i:]
    raise RunError(f"--resume latest: no checkpoint in {output_dir} is complete and intact (see the warnings); "
                   "remove them or start without --resume")


def load_resume(accelerator, candidates: list[Path], resume: str | None, identity: dict,
                anyway: bool = False) -> tuple[Path | None, dict]:
    """Restore model/optimizer/scheduler/RNG from the first of `candidates` (from `find_resume`)
    that loads; with "latest", one that fails to load is skipped with a warning. Returns
    (the checkpoint, its trainer state), or (None, {}) when there is nothing to resume."""
    for i, path in enumerate(candidates):
        state = read_state(path) if i == 0 else _checked_state(accelerator, path, resume, identity, anyway)
        if state is None:
            continue
        error = None
        try:
            accelerator.load_state(str(path))
        except RunError:
            raise  # the checkpoint does not fit this run (LoRA keys or shapes): never fall back silently
        except Exception as err:  # noqa: BLE001 - any failure to read a file means "corrupt here"
            error = err
        if not _agree(accelerator, error is None):
            cause = f"{type(error).__name__}: {error}" if error else "failed to load on another process"
            if resume != "latest":
                raise RunError(f"--resume {resume}: cannot load ({cause})") from error
            warn(f"skipping {path}: cannot load ({cause})")
            continue
        return path, state
    if candidates:
        raise RunError(f"--resume {resume}: no checkpoint in {candidates[0].parent} loads (see the warnings)")
    return None, {}


def rewind_logs(output_dir: str | Path, step: int) -> None:
    """Drop rows after `step` (and a truncated last line) from metrics*.jsonl, so a resumed run
    appends without duplicate steps. Main process only."""
    for path in sorted(Path(output_dir).glob("metrics*.jsonl")):
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a kill cut short
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line)
        tmp = path.with_name(f"{TMP}{path.name}")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)


def save_lora_weights(adapter, unet, output_dir: str | Path) -> Path:
    """The final LoRA file (diffusers format), written under a temporary folder and renamed."""
    output_dir = Path(output_dir)
    tmp = output_dir / f"{TMP}final-lora"
    _remove(tmp)
    written = adapter.save_lora(unet, tmp)
    _sync_tree(tmp)
    test_fault("final-written", 0)
    final = output_dir / written.name
    publish(written, final)
    _remove(tmp)
    return final


def save_full_unet(unet, output_dir: str | Path, subfolder: str = "unet") -> Path:
    """A full fine-tune's denoiser as a diffusers folder (`output_dir/unet`, or `transformer` for a DiT:
    `subfolder`, the pipeline component's name), in float32 safetensors, written under a temporary name
    and renamed."""
    out = Path(output_dir) / subfolder
    tmp = Path(output_dir) / f"{TMP}{subfolder}"
    _remove(tmp)
    unet.save_pretrained(tmp, safe_serialization=True)
    _sync_tree(tmp)
    test_fault("final-written", 0)
    publish(tmp, out)
    return out


BEST = "best"
BEST_RECORD = "best.json"


def save_best(adapter, unet, output_dir: str | Path, record: dict, *, lora: bool) -> Path:
    """`output_dir/best/`: the weights of the best gold evaluation so far (as the run's own output:
    the LoRA file, or the denoiser folder) and `best.json` (`record`: step, scores), written under a
    temporary name and renamed over the previous best."""
    output_dir = Path(output_dir)
    tmp = output_dir / f"{TMP}{BEST}"
    _remove(tmp)
    tmp.mkdir(parents=True)
    if lora:
        save_lora_weights(adapter, unet, tmp)
    else:
        save_full_unet(unet, tmp, subfolder=adapter.lora_component)
    (tmp / BEST_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    _sync_tree(tmp)
    final = output_dir / BEST
    publish(tmp, final)
    return final


def promote_best(output_dir: str | Path) -> Path:
    """Make the best evaluation's weights the run's result: copy best/'s weights (file or folder) to
    `output_dir`, each through a temporary name; returns the result's path."""
    output_dir = Path(output_dir)
    result = None
    for item in sorted((output_dir / BEST).iterdir()):
        if item.name == BEST_RECORD:
            continue
        tmp = output_dir / f"{TMP}{item.name}"
        _remove(tmp)
        if item.is_dir():
            shutil.copytree(item, tmp)
        else:
            shutil.copy2(item, tmp)
        if tmp.is_dir():
            _sync_tree(tmp)
        else:
            fsync_file(tmp)
        publish(tmp, output_dir / item.name)
        result = output_dir / item.name
    return result
