"""data_shards at full strength: resume, compressed inputs, every scorer, segmenters, loaders, bad shards."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from prefpretrain.data_shards import tokenizer as toklib
from prefpretrain.data_shards.build import ShardOptions, build_shards
from prefpretrain.data_shards.loader import MixtureDataset, train_loader
from prefpretrain.data_shards.packing import Layout, PackedSet
from prefpretrain.data_shards.reader import ShardSet
from prefpretrain.data_shards.sources import stdlib_root
from tests.conftest import ROOT, cli_env


def _shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.endswith((".tar", ".idx.npy"))}


@pytest.mark.cli
def test_interrupted_shard_run_resumes_to_the_same_bytes(tmp_path):
    files = sorted(str(p) for p in stdlib_root().glob("*.py"))[:30]
    args = ["--input", *files, "--scorer", "pep8", "--vocab-size", "400", "--workers", "1", "--shard-size-mb", "0.1"]
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "prefpretrain", "shard", "--output", str(ref), *args], check=True,
                   env=cli_env(), cwd=ROOT, capture_output=True)
    n_chunks = len(json.loads((ref / "_progress" / "plan.json").read_text())["chunks"])
    assert n_chunks >= 4

    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "prefpretrain", "shard", "--output", str(out), *args], env=cli_env(),
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "_progress" / "chunk-000001.json").is_file() and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    finished = len(list((out / "_progress").glob("chunk-*.json")))
    assert 2 <= finished < n_chunks and not (out / "manifest.json").is_file()

    r = subprocess.run([sys.executable, "-m", "prefpretrain", "shard", "--output", str(out), *args], env=cli_env(),
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"{finished} of {n_chunks} chunks already finished" in r.stderr
    assert _shard_files(out) == _shard_files(ref)
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (ref, out))
    assert a["splits"] == b["splits"] and a["skipped"] == b["skipped"]

    r = subprocess.run([sys.executable, "-m", "prefpretrain", "shard", "--output", str(out), *args[:-2],
                        "--shard-size-mb", "1"], env=cli_env(), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "other inputs or options" in r.stderr


def test_compressed_inputs_give_the_same_documents(tmp_path, stdlib_files):
    import zstandard

    src = Path(stdlib_files[0]).read_bytes()
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.py").write_bytes(src)
    (d / "b.py.gz").write_bytes(gzip.compress(src))
    (d / "c.py.zst").write_bytes(zstandard.ZstdCompressor().compress(src))
    m = build_shards(ShardOptions(inputs=[str(d)], output=str(tmp_path / "out"), vocab_size=300, workers=1,
                                  val_fraction=0.0, progress=False))
    assert m["splits"]["train"]["samples"] == 3 and m["skipped"] == {}
    ss = ShardSet(tmp_path / "out")
    docs = [ss.read(i) for i in range(3)]
    assert [x["meta"]["source"].rsplit("/", 1)[-1] for x in docs] == ["a.py", "b.py.gz", "c.py.zst"]
    for x in docs[1:]:
        assert (x["tokens"] == docs[0]["tokens"]).all() and (x["scores"] == docs[0]["scores"]).all()


def test_huge_lines_and_scorer_failures_are_counted(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "minified.py").write_text("x = [" + "1, " * 10000 + "]\n")
    (d / "ok.txt").write_text("A plain sentence. Another one.\n")
    (d / "recs.jsonl").write_text('{"text": "scored doc", "s": 0.5}\n{"text": "no score"}\n'
                                  '{"text": "two. segments.", "s": [0.1, 0.2, 0.3]}\n')
    m = build_shards(ShardOptions(inputs=[str(d)], output=str(tmp_path / "none"), scorer="none",
                                  vocab_size=300, workers=1, val_fraction=0.0, progress=False))
    assert m["skipped"] == {"huge_line": 1}
    assert "minified.py: a line of 30006 chars" in (tmp_path / "none" / "skipped.log").read_text()
    m = build_shards(ShardOptions(inputs=[str(d)], output=str(tmp_path / "out"), scorer="field", score_field="s",
                                  segmenter="sentence", vocab_size=300, workers=1, val_fraction=0.0, progress=False))
    # two files are not JSONL (no score field), one record has none, one has 3 scores for 2 sentences
    assert m["skipped"] == {"missing_score": 3, "scorer_error": 1}
    assert m["splits"]["train"]["samples"] == 1
    log = (tmp_path / "out" / "skipped.log").read_text()
    assert "recs.jsonl:2: no numeric field 's'" in log and "recs.jsonl#3: scorer failed" in log


def test_field_scores_reach_every_token(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "r.jsonl").write_text('{"text": "Good text here. Bad text there.", "s": [0.0, 2.5]}\n'
                               '{"text": "All fine.", "s": 0.25}\n')
    build_shards(ShardOptions(inputs=[str(d)], output=str(tmp_path / "out"), scorer="field", score_field="s",
                              segmenter="sentence", vocab_size=300, workers=1, val_fraction=0.0, progress=False))
    ss = ShardSet(tmp_path / "out")
    tok = toklib.load_tokenizer(ss.tokenizer_dir)
    a = ss.read(0)
    assert list(a["seg_score"]) == [0.0, 2.5]
    second = a["tokens"][a["seg_start"][1]:-1]
    assert tok.decode(second.tolist()) == " Bad text there."
    assert set(a["scores"][a["seg_start"][1]:].tolist()) == {2.5}
    assert set(ss.read(1)["scores"].tolist()) == {0.25}


def test_user_scorer_module_function_in_worker_processes(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("xx\nab\n")
    (d / "b.txt").write_text("no letters of that kind\nxxxx\n")
    m = build_shards(ShardOptions(inputs=[str(d)], output=str(tmp_path / "out"), scorer="tests.scorer_fns:x_share",
                                  segmenter="line", vocab_size=300, workers=2, val_fraction=0.0, progress=False))
    assert m["scorer"]["name"] == "tests.scorer_fns:x_share"
    ss = ShardSet(tmp_path / "out")
    assert ss.read(0)["seg_score"].tolist() == [pytest.approx(2 / 3), 0.0]


def test_dataloader_workers_do_not_change_the_order(tiny_shards):
    ss = ShardSet(tiny_shards)
    ds = MixtureDataset([PackedSet(ss, Layout("mle"), 32)], [1.0], seed=5)
    batches = {}
    for w in (0, 2):
        it = train_loader(ds, start_step=3, max_steps=6, micro=2, global_batch=4, rank=1, world=2, num_workers=w)
        batches[w] = [(b["position"].tolist(), b["input_ids"]) for b in it]
    assert [p for p, _ in batches[0]] == [[14, 15], [18, 19], [22, 23]]
    for (p0, x0), (p2, x2) in zip(batches[0], batches[2], strict=True):
        assert p0 == p2 and torch.equal(x0, x2)


def test_skip_corrupt_blanks_only_the_samples_that_touch_the_bad_shard(tmp_path, stdlib_files):
    out = tmp_path / "s"
    build_shards(ShardOptions(inputs=stdlib_files, output=str(out), vocab_size=300, workers=1, val_fraction=0.0,
                              shard_size_mb=0.03, progress=False))
    m = json.loads((out / "manifest.json").read_text())
    bad = m["splits"]["train"]["shards"][1]
    raw = bytearray((out / bad["name"]).read_bytes())
    raw[600] ^= 0xFF
    (out / bad["name"]).write_bytes(bytes(raw))
    ps = PackedSet(ShardSet(out), Layout("mle"), 64, skip_corrupt=True)
    flags = [bool(ps[i]["corrupt"]) for i in range(len(ps))]
    assert 0 < sum(flags) < len(flags)
    blank = ps[flags.index(True)]
    assert (blank["labels"] == -100).all()
    strict = PackedSet(ShardSet(out), Layout("mle"), 64)
    with pytest.raises(Exception, match="sha256 mismatch"):
        strict[flags.index(True)]


def test_sentence_segments_for_prose(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "p.txt").write_text("Dr. Smith arrived at 9 a.m. on Monday. He left early! Why?\nNew line here.\n")
    build_shards(ShardOptions(inputs=[str(d)], output=str(tmp_path / "out"), scorer="none", segmenter="sentence",
                              vocab_size=300, workers=1, val_fraction=0.0, progress=False))
    ss = ShardSet(tmp_path / "out")
    tok = toklib.load_tokenizer(ss.tokenizer_dir)
    doc = ss.read(0)
    bounds = list(doc["seg_start"]) + [len(doc["tokens"]) - 1]
    segs = [tok.decode(doc["tokens"][a:b].tolist()) for a, b in zip(bounds, bounds[1:], strict=False)]
    assert segs == ["Dr. Smith arrived at 9 a.m. on Monday.", " He left early!", " Why?\n", "New line here.\n"]


@pytest.mark.cli
def test_shard_progress_and_workers_flag_exist():
    r = subprocess.run([sys.executable, "-m", "prefpretrain", "shard", "--help"], capture_output=True, text=True,
                       env=cli_env(), cwd=ROOT)
    for flag in ("--workers", "--scorer-params", "--overwrite", "--segmenter", "--score-field"):
        assert flag in r.stdout
    assert os.cpu_count()


def test_ranks_of_any_world_size_read_the_same_global_sequence(tiny_shards):
    """What ranks read (the token content, not just positions) for world size 1, 2 and 3 is one sequence."""
    ss = ShardSet(tiny_shards)
    sp = json.loads((tiny_shards / "manifest.json").read_text())["tokenizer"]["special_ids"]
    ds = MixtureDataset([PackedSet(ss, Layout("conditional", 0.0, 0.1, 3, sp["aligned"], sp["misaligned"]), 32),
                         PackedSet(ss, Layout("mle"), 32)], [2.0, 1.0], seed=11)
    G, steps = 6, 5
    seqs = {}
    for world in (1, 2, 3):
        per_rank = [[b for b in train_loader(ds, 0, steps, G // world if world < 3 else 1, G, r, world)]
                    for r in range(world)]
        per_step = G // world // (G // world if world < 3 else 1)
        out = []
        for step in range(steps):
            for r in range(world):
                for b in per_rank[r][step * per_step:(step + 1) * per_step]:
                    out.extend(b["input_ids"])
        seqs[world] = torch.stack(out)
    assert seqs[1].shape == (steps * G, 32)
    assert torch.equal(seqs[1], seqs[2]) and torch.equal(seqs[1], seqs[3])


def test_too_large_documents_are_skipped(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "big.txt").write_text(("word " * 20 + "\n") * 21000)
    (d / "small.txt").write_text("Fine.\n")
    m = build_shards(ShardOptions(inputs=[str(d)], output=str(tmp_path / "out"), scorer="none", vocab_size=300,
                                  workers=1, val_fraction=0.0, progress=False))
    assert m["skipped"] == {"too_large": 1} and m["splits"]["train"]["samples"] == 1


def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01  # one bit
    path.write_bytes(bytes(raw))


def test_every_file_the_reader_trusts_is_checked(tmp_path, stdlib_files, caplog):
    """An index with one flipped bit (it would shift every token read), a replaced tokenizer, a packing cache
    with one changed value of the right shape: each is detected; a bad shard is hashed once and named once."""
    import logging
    import shutil

    from prefpretrain.data_shards import reader
    from prefpretrain.data_shards.reader import ShardError

    out = tmp_path / "s"
    build_shards(ShardOptions(inputs=stdlib_files, output=str(out), vocab_size=300, workers=1, val_fraction=0.0,
                              shard_size_mb=0.03, progress=False))
    shards = json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert all(len(sh["index_sha256"]) == 64 for sh in shards)
    c = tmp_path / "c"
    shutil.copytree(out, c)
    _flip(c / shards[0]["index"], (c / shards[0]["index"]).stat().st_size - 20)
    ss = ShardSet(c)  # opening stats the index files; each is hashed when first used
    with pytest.raises(ShardError, match=f"{shards[0]['index']}: sha256 mismatch \\(damaged index\\)"):
        ss.read(0)
    with pytest.raises(ShardError, match="damaged index"):
        PackedSet(ShardSet(c), Layout("mle"), 64)  # (computing the packing index uses them all)
    shutil.rmtree(c)
    shutil.copytree(out, c)
    tj = c / "tokenizer" / "tokenizer.json"
    tj.write_text(tj.read_text().replace('"<|aligned|>"', '"<|aligneD|>"'))
    with pytest.raises(ShardError, match="does not match the manifest's tokenizer hash"):
        ShardSet(c, verify=False)  # checked even without the shard checksums: it is small

    # the packing cache: a value changed, the shape kept -> recomputed, not used
    good = PackedSet(ShardSet(out), Layout("mle"), 64).cum.copy()
    (cache,) = (out / "packing_cache").glob("train-mle-*.npy")
    arr = np.load(cache)
    arr[len(arr) // 2] += 1
    np.save(cache, arr)
    with caplog.at_level(logging.WARNING):
        again = PackedSet(ShardSet(out), Layout("mle"), 64).cum
    assert np.array_equal(again, good) and "packing index damaged" in caplog.text

    # a corrupt shard under skip: named once in the log, hashed once however many samples touch it
    _flip(out / shards[1]["name"], 600)
    hashed: list[str] = []
    real = reader._sha256
    reader._sha256 = lambda p: hashed.append(Path(p).name) or real(p)
    try:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ps = PackedSet(ShardSet(out), Layout("mle"), 64, skip_corrupt=True)
            flags = [bool(ps[i]["corrupt"]) for i in range(len(ps))]
    finally:
        reader._sha256 = real
    assert sum(flags) >= 2 and hashed.count(shards[1]["name"]) == 1
    assert caplog.text.count(f"{shards[1]['name']}: sha256 mismatch") == 1


@pytest.mark.dist
def test_zero_token_work_and_too_many_corrupt_samples_stop_the_run(tmp_path, stdlib_files):
    from tests.conftest import launch_tiny, run_cli, tiny_overrides

    out = tmp_path / "s"
    build_shards(ShardOptions(inputs=stdlib_files, output=str(out), vocab_size=300, workers=1, val_fraction=0.2,
                              shard_size_mb=0.03, progress=False))
    shards = json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]
    _flip(out / shards[1]["name"], 600)
    kw = {"train.max_steps": 60, "data.on_corrupt": "skip", "train.log_every": 10, "checkpoint.every_steps": 0,
          "eval.every_steps": 0}
    r = launch_tiny(out, tmp_path / "r1", nproc=1, expect=2, **kw, **{"data.max_corrupt_fraction": 0.05})
    assert "data.max_corrupt_fraction:" in r.stderr and f"{shards[1]['name']}: sha256 mismatch" in r.stderr
    seen = int(r.stderr.split("data.max_corrupt_fraction: ")[1].split(" of the ")[1].split()[0])
    assert seen >= 200  # judged once 10 / 0.05 samples were seen, not on the first corrupt one
    launch_tiny(out, tmp_path / "r2", nproc=1, **kw, **{"data.max_corrupt_fraction": 0.9})  # told to tolerate it
    for sh in shards:  # nothing left to train on: an error, not a loss of 0
        _flip(out / sh["name"], 600)
    r = launch_tiny(out, tmp_path / "r3", nproc=1, expect=2, **kw, **{"data.max_corrupt_fraction": 0.99})
    assert "the global batch holds no target token" in r.stderr
    # no validation sample, and a one-token causal sample: refused before training
    none = tmp_path / "noval"
    build_shards(ShardOptions(inputs=stdlib_files[:3], output=str(none), vocab_size=300, workers=1, val_fraction=0.0,
                              progress=False))
    r = run_cli("train", "configs/tiny.yaml", *tiny_overrides(none, tmp_path / "r4"))
    assert r.returncode == 2 and f"the validation split of {none} yields no 64-token sample" in r.stderr
    r = run_cli("train", "configs/tiny.yaml", *tiny_overrides(none, tmp_path / "r5", **{"data.seq_len": 1}))
    assert r.returncode == 2 and "data.seq_len: a causal model needs at least 2 tokens" in r.stderr


@pytest.mark.cli
def test_damaged_inputs_and_bad_requests_are_one_line(tmp_path, stdlib_files):
    """Damaged .gz / .zst inputs are counted as unreadable; an output that is a file, an override that is a YAML
    alias or tag, a config that is a list and a rank count below 1 are one line and exit 2."""
    import zstandard

    from tests.conftest import run_cli

    src = Path(stdlib_files[0]).read_bytes()
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.py").write_bytes(src)
    gz = bytearray(gzip.compress(src))
    gz[len(gz) // 2] ^= 0xFF  # damaged, not truncated: zlib.error or a bad CRC
    (d / "b.py.gz").write_bytes(bytes(gz))
    (d / "c.py.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 50)  # a zstd frame magic, then junk
    m = build_shards(ShardOptions(inputs=[str(d)], output=str(tmp_path / "out"), vocab_size=300, workers=1,
                                  val_fraction=0.0, progress=False))
    assert m["splits"]["train"]["samples"] == 1 and m["skipped"] == {"unreadable": 2}
    assert zstandard  # (the optional dependency the .zst reader needs)
    (tmp_path / "afile").write_text("x")
    cases = [
        (["shard", "--input", str(d / "a.py"), "--output", str(tmp_path / "afile")], "is a file, not a directory"),
        (["train", "configs/tiny.yaml", "train.lr=*anchor"], "train.lr: not a plain YAML value"),
        (["train", "configs/tiny.yaml", "train.lr=!!python/object:os.system x"], "train.lr: not a plain YAML value"),
        (["launch", "configs/tiny.yaml", "--nproc-per-node", "0"], "--nproc-per-node: 0; at least 1"),
        (["train", "configs/tiny.yaml", "monitor.loggers=[tensorboard,neptune]"],
         "monitor.loggers: unknown logger 'neptune' (choose from tensorboard, wandb, mlflow)"),
        (["launch", "configs/tiny.yaml", "--nproc-per-node", "-1"], "--nproc-per-node: -1; at least 1"),
    ]
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    cases.append((["train", str(tmp_path / "list.yaml")], "holds a list, not a mapping of sections"))
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if mounted.returncode == 0:  # (root only: a read-only file system refuses root too)
        cases.append((["shard", "--input", str(d / "a.py"), "--output", str(ro / "out")], f"{ro} is not writable"))
    try:
        for argv, says in cases:
            r = run_cli(*argv)
            lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("prefpretrain")]
            assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr and len(lines) == 1, argv
    finally:  # (a mount left behind would outlive the test's directory)
        subprocess.run(["umount", str(ro)], capture_output=True, check=False)


@pytest.mark.dist
def test_a_damaged_shard_stops_training_with_one_line(tmp_path, tiny_shards):
    import shutil

    from tests.conftest import run_cli, tiny_overrides

    c = tmp_path / "copy"
    shutil.copytree(tiny_shards, c)
    name = json.loads((c / "manifest.json").read_text())["splits"]["train"]["shards"][0]["name"]
    _flip(c / name, 700)
    r = run_cli("train", "configs/tiny.yaml", *tiny_overrides(c, tmp_path / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"prefpretrain: error: {c / name}: sha256 mismatch (corrupt shard)"
    assert json.loads((tmp_path / "run" / "failure.json").read_text())["reason"] == "refused"


@pytest.mark.dist
def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_stays(tmp_path, tiny_shards):
    from prefpretrain.trainer.checkpoint import find_latest
    from tests.conftest import run_cli, tiny_overrides

    fs = tmp_path / "small"
    fs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(fs)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        run = fs / "run"
        r = run_cli("train", "configs/tiny.yaml", *tiny_overrides(tiny_shards, run, **{
            "train.max_steps": 400, "checkpoint.every_steps": 1, "checkpoint.keep_last": 1000, "eval.every_steps": 0,
            "train.log_every": 50}), timeout=600)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"prefpretrain: error: no space left on the device of {run / 'checkpoints'} (")
        intact = find_latest(run / "checkpoints")  # verified: every file matches its checksum
        assert intact is not None and last.endswith(f"while saving step {int(intact.name[5:]) + 1}; "
                                                    f"{intact.name} is intact")
    finally:
        subprocess.run(["umount", str(fs)], check=False)

