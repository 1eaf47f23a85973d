"""Checkpoints: DeepSpeed's own save plus our state; `latest` written last, atomically.

Layout: RUN/checkpoints/step_00000100/{DeepSpeed files, state.json, rng_rank*.json} and
RUN/checkpoints/latest (the tag). A checkpoint is complete when state.json exists, which rank 0
writes after every rank finished saving; `latest` then moves to it, so a crash mid-save leaves the
previous checkpoint as `latest`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import pickle
import random
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from prefpretrain import distributed
from prefpretrain.errors import InputError
from prefpretrain.rundir import atomic_write
from prefpretrain.trainer import safe_load

log = logging.getLogger(__name__)
STATE = "state.json"  # a checkpoint's record: step, data position, checksums of its files; written last
LATEST = "latest"  # CHECKPOINTS/latest: the tag of the newest complete checkpoint


def rng_state() -> dict:
    """Every generator a rank draws from: Python, numpy, torch's CPU one and, on a GPU, the current device's
    (dropout on CUDA draws from it: without it a resume is exact only with dropout 0)."""
    s = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state().tolist()  # the current device's (the rank's own)
    return s


def set_rng_state(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    np.random.set_state(s["numpy"])
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(s["cuda"], dtype=torch.uint8))
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        log.warning("the checkpoint holds no CUDA RNG state (written on CPU ranks): dropout draws start afresh")


def _np_json(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def _checksum(p: Path) -> str:
    """CRC-32 of a file: detects damage (truncation, flipped bits) at ~4x the speed of sha256; not a
    defence against tampering."""
    crc = 0
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
    return f"crc32:{crc:08x}"


def _mine(name: str, rank: int, world: int) -> bool:
    """Which rank hashes a checkpoint file: the one whose rank is in its name, else rank 0."""
    for r in range(world):
        if f"rank_{r}_" in name or name == f"rng_rank{r}.json":
            return r == rank
    return rank == 0


def save(engine, ckpt_root: Path, step: int, state: dict, keep_last: int, rank: int,
         timings: dict | None = None) -> Path:
    tag = f"step_{step:08d}"
    t0 = time.perf_counter()
    d = ckpt_root / tag
    with _disk_full_is_one_line(ckpt_root, step):
        engine.save_checkpoint(str(ckpt_root), tag=tag, save_latest=False)
        atomic_write(d / f"rng_rank{rank}.json", json.dumps(rng_state(), default=_np_json))
    distributed.barrier()
    t1 = time.perf_counter()
    world = distributed.world()
    mine = {p.name: _checksum(p) for p in sorted(d.iterdir())
            if p.is_file() and p.name != STATE and _mine(p.name, rank, world)}
    everyone = distributed.all_gather_object(mine)  # every rank hashes what it wrote, in parallel
    if timings is not None:
        timings.update(deepspeed=t1 - t0, checksums=time.perf_counter() - t1)
    if rank == 0:
        files = {k: v for part in everyone for k, v in part.items()}
        with _disk_full_is_one_line(ckpt_root, step):
            atomic_write(d / STATE, json.dumps(dict(state, tag=tag, step=step, files=files), indent=1))
            atomic_write(ckpt_root / LATEST, tag)
        done = sorted(p for p in ckpt_root.glob("step_*") if (p / STATE).is_file())
        for old in done[: max(0, len(done) - keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)
    distributed.barrier()
    return d


@contextlib.contextmanager
def _disk_full_is_one_line(ckpt_root: Path, step: int):
    """A full disk while saving (torch's writer says 'unexpected pos' or 'file write failed', Python ENOSPC) is
    one line naming the directory and the checkpoint that is still intact (this one never got its state.json)."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full and any(m in str(e) for m in ("Disk quota", "No space left", "unexpected pos",
                                                  "file write failed")):
            try:
                full = shutil.disk_usage(ckpt_root).free < 64 << 20
            except OSError:
                full = True
        if not full:
            raise
        free = shutil.disk_usage(ckpt_root).free
        intact = find_latest(ckpt_root, check=False)
        raise InputError(f"no space left on the device of {ckpt_root} ({free / 1e6:.1f} MB free) while saving step "
                         f"{step}; {intact.name if intact else 'no earlier checkpoint'} is intact") from None


def verify(ckpt: Path) -> str | None:
    """None if every file matches the checksum recorded at save time, else what is wrong."""
    try:
        files = read_state(ckpt).get("files", {})
    except InputError as e:
        return str(e).removeprefix(f"{ckpt}/")
    if not files:
        return "state.json lists no files"
    for name, digest in files.items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if _checksum(p) != digest:
            return f"{name} does not match its checksum"
    return None


def complete(ckpt_root: Path) -> list[Path]:
    """Checkpoints whose save finished (state.json written), newest first; damaged or not."""
    return sorted((p for p in ckpt_root.glob("step_*") if p.is_dir() and (p / STATE).is_file()), reverse=True)


def find_latest(ckpt_root: Path, check: bool = True) -> Path | None:
    """The newest complete (and, with `check`, undamaged) checkpoint: `latest` first, then older ones."""
    done = complete(ckpt_root)
    lp = ckpt_root / LATEST
    if lp.is_file():
        named = ckpt_root / lp.read_text().strip()
        if named in done:
            done.remove(named)
            done.insert(0, named)
        else:
            log.warning("checkpoint %s named by `latest` is incomplete; looking for an older one", named)
    for d in done:
        problem = verify(d) if check else None
        if problem is None:
            return d
        log.warning("checkpoint %s is damaged (%s); using an older one", d, problem)
    return None


def read_state(ckpt: Path) -> dict:
    """A checkpoint's state.json; an unreadable one is a damaged checkpoint (InputError naming it)."""
    p = ckpt / STATE
    try:
        st = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(st, dict):
        raise InputError(f"{p}: not a JSON object")
    return st


def universal(ckpt: Path) -> Path:
    """The DeepSpeed universal form of a ZeRO checkpoint, converted once next to it by rank 0 while the other
    ranks wait on the store (up to engine.timeout_s; the conversion of a large model takes minutes)."""
    import subprocess
    import sys

    out = ckpt.with_name(ckpt.name + "_universal")

    def convert() -> None:
        if (out / "converted").is_file():
            problem = _universal_problem(out)
            if problem is None:
                return
            log.warning("universal checkpoint %s is damaged (%s); converting again", out, problem)
        shutil.rmtree(out, ignore_errors=True)
        r = subprocess.run([sys.executable, "-m", "prefpretrain.trainer.safe_load", "--input_folder", str(ckpt),
                            "--output_folder", str(out), "--inject_missing_state"], capture_output=True, text=True,
                           check=False)  # DeepSpeed's ds_to_universal, loading weights-only
        if r.returncode != 0 and "Weights only load failed" in r.stderr:
            raise safe_load.refusal(ckpt, pickle.UnpicklingError(r.stderr[r.stderr.find("Weights only"):]))
        if r.returncode != 0:
            raise RuntimeError(f"converting {ckpt} to a universal checkpoint failed:\n{r.stderr[-3000:]}")
        files = {str(p.relative_to(out)): _checksum(p) for p in sorted(out.rglob("*")) if p.is_file()}
        atomic_write(out / "converted", json.dumps({"files": files}, indent=1))

    distributed.rank0_does(f"converting {ckpt.name} to a universal checkpoint", convert)
    return out


def _universal_problem(out: Path) -> str | None:
    """None if every file of a universal form matches the CRC-32 its conversion recorded (and none was added)."""
    try:
        files = json.loads((out / "converted").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no checksums recorded"
    present = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "converted"}
    if present != set(files):
        return "its files are not the converted ones"
    bad = next((n for n, crc in files.items() if _checksum(out / n) != crc), None)
    return f"{bad} does not match its checksum" if bad else None


def load(engine, ckpt: Path, rank: int) -> None:
    """Model, optimizer and scheduler from a checkpoint (or its universal form), and this rank's RNG; every file
    is unpickled weights-only (trainer/safe_load.py): one naming other Python objects is refused."""
    safe_load.enforce()
    try:
        engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
    except Exception as e:
        if safe_load.is_refusal(e):
            raise safe_load.refusal(ckpt, e) from None
        raise
    _steps_beside_their_parameters(getattr(engine, "basic_optimizer", None) or engine.optimizer)
    rng = ckpt / f"rng_rank{rank}.json"
    if rng.is_file():
        set_rng_state(json.loads(rng.read_text()))
    else:
        log.info("no RNG state for rank %d in %s (another world size); RNG starts from the seed", rank, ckpt)


def _steps_beside_their_parameters(opt) -> None:
    """torch's fused AdamW reads each parameter's `step` from the parameter's device; DeepSpeed's universal
    loader writes the steps it read on the CPU straight into the state (torch's load_state_dict, which would
    move them, is bypassed): a CUDA kernel would be handed a host pointer."""
    if not getattr(opt, "defaults", {}).get("fused"):
        return
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            step = st.get("step") if st else None
            if torch.is_tensor(step) and step.device != p.device:
                st["step"] = step.to(p.device, torch.float32)


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from a DeepSpeed checkpoint of any ZeRO stage and world size, in one process."""
    state = read_state(ckpt)
    from prefpretrain.trainer.engine import deepspeed_env

    deepspeed_env()
    safe_load.enforce()
    try:
        if state.get("zero_stage", 0) >= 1:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with contextlib.redirect_stdout(sys.stderr):  # (it prints progress: stdout is `evaluate`'s JSON)
                sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        else:
            sd = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    except Exception as e:
        if safe_load.is_refusal(e):
            raise safe_load.refusal(ckpt, e) from None
        raise
    return {k: v.float() for k, v in sd.items()}
