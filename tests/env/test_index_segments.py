"""Incremental index checkpoints: a base segment, delta segments of changed rows, a manifest naming them.

The reference is the in-memory index itself (and a full save of it): what a manifest loads must equal it bit
for bit. Rotation is simulated as ``save_checkpoint(keep=2)`` and GRPO's after-checkpoint hook do it.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from killed_writer import kill_writer
from searchr3_env.index import (
    COMPACT_ABOVE,
    DELTA_FORMAT,
    FORMAT,
    MANIFEST_FORMAT,
    CorpusIndex,
    IndexFileError,
    prune_segments,
)

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden" / "corpus-index-v1.npz"  # written by the single-file save of 2026-12


def unit(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_index(n=2000, dim=32, seed=0) -> CorpusIndex:
    rng = np.random.default_rng(seed)
    return CorpusIndex([f"d{i}" for i in range(n)], unit(rng, n, dim), 1, encoder_name="enc",
                       corpus_fingerprint="c" * 64)


def refresh(index: CorpusIndex, rng, fraction: float, version: int) -> np.ndarray:
    """Re-encode a random ``fraction`` of the rows (as a local refresh does); returns their positions."""
    rows = rng.choice(len(index), max(1, int(fraction * len(index))), replace=False)
    index.update(rows, unit(rng, len(rows), index.dim), version)
    return np.sort(rows)


def assert_same(loaded: CorpusIndex, index: CorpusIndex) -> None:
    assert loaded.doc_ids == index.doc_ids
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)  # bit for bit: exact float equality
    assert loaded.embeddings.tobytes() == index.embeddings.tobytes()
    np.testing.assert_array_equal(loaded.versions, index.versions)
    assert loaded.index_version == index.index_version
    assert (loaded.factory, loaded.encoder_name, loaded.corpus_fingerprint) == (
        index.factory, index.encoder_name, index.corpus_fingerprint)


def manifest_of(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def segment_files(manifest_path: Path) -> list[str]:
    return [s["file"] for s in manifest_of(manifest_path)["segments"]]


def snapshot(index: CorpusIndex) -> CorpusIndex:
    return pickle.loads(pickle.dumps(index))


# ---------------------------------------------------------------- round trips


def test_round_trip_after_refreshes_equals_the_index_bit_for_bit(tmp_path):
    index, rng = make_index(), np.random.default_rng(1)
    for step in range(1, 6):
        refresh(index, rng, 0.01, version=step + 1)
        path = index.save_incremental(tmp_path, f"step-{step}")
        assert path == tmp_path / f"step-{step}.json"
        loaded = CorpusIndex.load_incremental(path, corpus_fingerprint="c" * 64, dim=32)
        assert_same(loaded, index)
        index.save(tmp_path / "full.npz")  # and equal to today's full save of the same index
        assert_same(loaded, CorpusIndex.load(tmp_path / "full.npz"))
    manifest = manifest_of(path)
    assert manifest["format"] == MANIFEST_FORMAT
    assert len(manifest["segments"]) == 5  # a base (the first save), four deltas
    for field in ("corpus_fingerprint", "dim", "rows", "encoder_name", "encoder_version", "oldest_row_version",
                  "index_version", "factory"):
        assert manifest[field] == index.manifest()[field], field


def test_a_loaded_index_keeps_extending_its_segments(tmp_path):
    index, rng = make_index(), np.random.default_rng(2)
    index.save_incremental(tmp_path, "a")
    refresh(index, rng, 0.01, 2)
    index.save_incremental(tmp_path, "b")
    resumed = CorpusIndex.load_incremental(tmp_path / "b.json")  # a resumed run
    refresh(resumed, rng, 0.01, 3)
    resumed.save_incremental(tmp_path, "c")
    assert segment_files(tmp_path / "c.json")[:2] == segment_files(tmp_path / "b.json")  # shared, not rewritten
    assert_same(CorpusIndex.load_incremental(tmp_path / "c.json"), resumed)
    assert_same(CorpusIndex.load_incremental(tmp_path / "b.json"), index)  # the older manifest is untouched


def test_only_changed_rows_are_written(tmp_path):
    index, rng = make_index(n=5000, dim=64), np.random.default_rng(3)
    index.save_incremental(tmp_path, "a")
    base = tmp_path / segment_files(tmp_path / "a.json")[0]
    changed = np.union1d(refresh(index, rng, 0.01, 2), refresh(index, rng, 0.005, 3))  # two refreshes, some overlap
    index.save_incremental(tmp_path, "b")
    delta = tmp_path / segment_files(tmp_path / "b.json")[1]
    with np.load(delta) as z:
        np.testing.assert_array_equal(z["positions"], changed)
        np.testing.assert_array_equal(z["embeddings"], index.embeddings[changed])
        np.testing.assert_array_equal(z["versions"], index.versions[changed])
        assert json.loads(bytes(z["manifest"]).decode())["format"] == DELTA_FORMAT
    row_bytes = 64 * 4 + 8 + 8  # embedding, position, version
    assert delta.stat().st_size <= len(changed) * row_bytes + 4096
    assert delta.stat().st_size < base.stat().st_size / 50
    before = sorted(p.name for p in tmp_path.iterdir())
    index.save_incremental(tmp_path, "c")  # nothing changed since b: no new segment
    assert segment_files(tmp_path / "c.json") == segment_files(tmp_path / "b.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["c.json"])


def test_a_base_segment_is_a_single_file_index(tmp_path):
    index = make_index()
    index.save_incremental(tmp_path, "a")
    base = CorpusIndex.load(tmp_path / segment_files(tmp_path / "a.json")[0])
    assert_same(base, index)


# ---------------------------------------------------------------- compaction


def delta_share(manifest_path: Path) -> float:
    sizes = [s["bytes"] for s in manifest_of(manifest_path)["segments"]]
    return sum(sizes[1:]) / sizes[0]


def test_compaction_writes_a_new_base_once_deltas_exceed_the_share(tmp_path):
    index, rng = make_index(), np.random.default_rng(4)
    index.save_incremental(tmp_path, "s00")
    bases, counts = {segment_files(tmp_path / "s00.json")[0]}, []
    for step in range(1, 15):
        prev = tmp_path / f"s{step - 1:02d}.json"
        refresh(index, rng, 0.1, step + 1)
        path = index.save_incremental(tmp_path, f"s{step:02d}")
        files = segment_files(path)
        counts.append(len(files))
        assert delta_share(path) <= COMPACT_ABOVE
        if len(files) == 1:  # compacted: the deltas of the previous one and this step's would have passed the share
            new_delta = 0.1 * len(index) * (index.dim * 4 + 16)
            assert delta_share(prev) + new_delta / manifest_of(prev)["segments"][0]["bytes"] > COMPACT_ABOVE
            assert files[0] not in bases
            bases.add(files[0])
        else:
            assert files[:-1] == segment_files(prev)
        assert_same(CorpusIndex.load_incremental(path), index)
    assert counts.count(1) >= 2, counts  # ~9 % of the base per delta: a new base about every 6 saves
    assert max(counts) >= 5


@pytest.mark.parametrize("compact_above, lengths", [(0.0, [1, 1, 1]), (float("inf"), [1, 2, 3])])
def test_compaction_share_is_a_per_call_option(tmp_path, compact_above, lengths):
    index, rng = make_index(), np.random.default_rng(5)
    found = []
    for step in range(3):
        refresh(index, rng, 0.3, step + 2)
        found.append(len(segment_files(index.save_incremental(tmp_path, f"s{step}", compact_above=compact_above))))
    assert found == lengths


def test_added_rows_start_a_new_base(tmp_path, caplog):
    index, rng = make_index(), np.random.default_rng(6)
    index.save_incremental(tmp_path, "a")
    index.add(["new-1", "new-2"], unit(rng, 2, 32), 5)
    with caplog.at_level("INFO", logger="searchr3_env.index"):
        index.save_incremental(tmp_path, "b")
    assert "rows were added" in caplog.text
    assert len(segment_files(tmp_path / "b.json")) == 1
    assert segment_files(tmp_path / "b.json") != segment_files(tmp_path / "a.json")
    assert_same(CorpusIndex.load_incremental(tmp_path / "b.json"), index)
    refresh(index, rng, 0.01, 6)  # and deltas go on top of the new base
    assert len(segment_files(index.save_incremental(tmp_path, "c"))) == 2
    assert_same(CorpusIndex.load_incremental(tmp_path / "c.json"), index)


def test_another_folder_or_a_replaced_index_starts_a_new_base(tmp_path):
    index, rng = make_index(), np.random.default_rng(7)
    index.save_incremental(tmp_path / "one", "a")
    refresh(index, rng, 0.01, 2)
    index.save_incremental(tmp_path / "two", "a")
    assert len(segment_files(tmp_path / "two" / "a.json")) == 1
    assert_same(CorpusIndex.load_incremental(tmp_path / "two" / "a.json"), index)
    rebuilt = CorpusIndex(index.doc_ids, index.embeddings, index.versions)  # e.g. a full refresh's new snapshot
    rebuilt.save_incremental(tmp_path / "two", "b")
    assert len(segment_files(tmp_path / "two" / "b.json")) == 1


def test_pruned_segments_are_not_built_on(tmp_path):
    index, rng = make_index(), np.random.default_rng(8)
    index.save_incremental(tmp_path, "a")
    prune_segments(tmp_path, [])  # everything gone
    refresh(index, rng, 0.01, 2)
    index.save_incremental(tmp_path, "b")
    assert len(segment_files(tmp_path / "b.json")) == 1
    assert_same(CorpusIndex.load_incremental(tmp_path / "b.json"), index)


# ---------------------------------------------------------------- rotation


def test_rotation_keeps_every_segment_a_kept_checkpoint_needs(tmp_path):
    """save_checkpoint(keep=2) deletes old checkpoint folders; the index hook prunes to the kept ones' manifests."""
    run = tmp_path / "run"
    folder, checkpoints = run / "index", run / "checkpoints"
    index, rng = make_index(), np.random.default_rng(9)
    expected: dict[str, CorpusIndex] = {}
    saw_compaction_while_old_kept = False
    for step in range(1, 25):
        refresh(index, rng, 0.04, step + 1)
        name = f"step-{step:06d}"
        index.save_incremental(folder, name)  # GRPO's before_checkpoint
        expected[name] = snapshot(index)
        (checkpoints / name).mkdir(parents=True)  # save_checkpoint(keep=2)
        for old in sorted(checkpoints.glob("step-*"))[:-2]:
            shutil.rmtree(old)
        kept = {p.name for p in checkpoints.glob("step-*")}  # GRPO's after_checkpoint
        prune_segments(folder, kept)
        needed = set().union(*(segment_files(folder / f"{k}.json") for k in kept))
        assert {p.name for p in folder.iterdir()} == needed | {f"{k}.json" for k in kept}
        for k in kept:
            assert_same(CorpusIndex.load_incremental(folder / f"{k}.json"), expected[k])
        bases = {segment_files(folder / f"{k}.json")[0] for k in kept}
        saw_compaction_while_old_kept |= len(bases) == 2  # the old base survives while a kept step needs it
    assert saw_compaction_while_old_kept


def test_resume_from_an_older_kept_manifest_shares_its_segments(tmp_path):
    index, rng = make_index(), np.random.default_rng(10)
    for step in range(1, 4):
        refresh(index, rng, 0.01, step + 1)
        index.save_incremental(tmp_path, f"s{step}")
    older = CorpusIndex.load_incremental(tmp_path / "s2.json")
    refresh(older, rng, 0.01, 9)
    older.save_incremental(tmp_path, "s2b")
    removed = prune_segments(tmp_path, ["s2b", Path("s3.json")])
    assert {p.name for p in removed} == {"s1.json", "s2.json"}  # every segment is still needed by s2b or s3
    for name, want in (("s2b", older), ("s3", index)):
        assert_same(CorpusIndex.load_incremental(tmp_path / f"{name}.json"), want)
    only_s3 = segment_files(tmp_path / "s3.json")[-1]
    removed = prune_segments(tmp_path, ["s2b"])
    assert {p.name for p in removed} == {"s3.json", only_s3}
    assert {p.name for p in tmp_path.iterdir()} == set(segment_files(tmp_path / "s2b.json")) | {"s2b.json"}


def test_prune_leaves_foreign_files_and_keeps_all_segments_for_an_unreadable_kept_manifest(tmp_path):
    index, rng = make_index(), np.random.default_rng(11)
    index.save_incremental(tmp_path, "a")
    refresh(index, rng, 0.01, 2)
    index.save_incremental(tmp_path, "b")
    (tmp_path / "notes.json").write_text('{"hello": 1}')
    (tmp_path / "b.json").write_text((tmp_path / "b.json").read_text()[:50])  # a damaged kept manifest
    removed = prune_segments(tmp_path, ["b"])
    assert [p.name for p in removed] == ["a.json"]
    assert (tmp_path / "notes.json").is_file()
    assert len(list(tmp_path.glob("*.npz"))) == 2
    assert prune_segments(tmp_path / "missing", ["b"]) == []
    with pytest.raises(ValueError, match="plain file name"):
        index.save_incremental(tmp_path, "../escape")


# ---------------------------------------------------------------- refusals


@pytest.fixture
def chain(tmp_path):
    index, rng = make_index(), np.random.default_rng(12)
    index.save_incremental(tmp_path, "a")
    for step in range(2):
        refresh(index, rng, 0.01, step + 2)
        index.save_incremental(tmp_path, "a")
    return tmp_path / "a.json", [tmp_path / f for f in segment_files(tmp_path / "a.json")]


def test_a_missing_segment_is_refused_naming_it(chain):
    path, (base, d1, _) = chain
    for gone in (d1, base):
        gone.unlink()
        with pytest.raises(IndexFileError, match=f"{gone}: segment missing.*named by {path}"):
            CorpusIndex.load_incremental(path)


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_segment_is_refused_naming_it(chain, which, damage):
    path, files = chain
    raw = bytearray(files[which].read_bytes())
    if damage == "flip":  # inside the embeddings, which sit near the end of the zip
        raw[len(raw) - 2000] ^= 0x10
    else:
        raw = raw[: len(raw) // 2]
    files[which].write_bytes(bytes(raw))
    with pytest.raises(IndexFileError, match=f"{files[which]}: (checksum mismatch|unreadable or truncated)"):
        CorpusIndex.load_incremental(path)


def test_a_segment_swapped_for_another_valid_one_is_refused(chain):
    path, (_, d1, d2) = chain
    shutil.copy(d1, d2)  # a valid delta under the wrong name
    with pytest.raises(IndexFileError, match=f"{d2}: checksum mismatch"):
        CorpusIndex.load_incremental(path)


def resign(path: Path, edit) -> None:
    """Edit a manifest and recompute its checksum, as a careless tool would."""
    from searchr3_env.index import _checksum

    manifest = manifest_of(path)
    edit(manifest)
    manifest["sha256"] = _checksum({}, manifest)
    path.write_text(json.dumps(manifest))


def test_deltas_out_of_order_are_refused(chain):
    path, files = chain
    resign(path, lambda m: m["segments"].__setitem__(slice(1, 3), m["segments"][2:0:-1]))
    with pytest.raises(IndexFileError, match=f"{files[2]}: a delta on {files[1].name}, but .* puts it on"):
        CorpusIndex.load_incremental(path)


def test_edited_or_mismatched_manifests_are_refused(chain, tmp_path):
    path, _ = chain
    with pytest.raises(IndexFileError, match="not this dataset's"):
        CorpusIndex.load_incremental(path, corpus_fingerprint="other")
    with pytest.raises(IndexFileError, match="dim 32, expected 8"):
        CorpusIndex.load_incremental(path, dim=8)
    manifest = manifest_of(path)
    path.write_text(json.dumps(manifest | {"index_version": 99}))
    with pytest.raises(IndexFileError, match=f"{path}: checksum mismatch"):
        CorpusIndex.load_incremental(path)
    resign(path, lambda m: m.update(rows=7))
    with pytest.raises(IndexFileError, match="the manifest says 7 x 32"):
        CorpusIndex.load_incremental(path)
    path.write_text("{not json")
    with pytest.raises(IndexFileError, match=f"{path}: unreadable or truncated index manifest"):
        CorpusIndex.load_incremental(path)
    with pytest.raises(IndexFileError, match="no such index manifest"):
        CorpusIndex.load_incremental(tmp_path / "nothing.json")
    other = tmp_path / "old.json"
    other.write_text(json.dumps({"format": FORMAT, "segments": [{"file": "base-" + "0" * 32 + ".npz"}]}))
    with pytest.raises(IndexFileError, match="expected a searchr3-corpus-index-manifest/1 manifest"):
        CorpusIndex.load_incremental(other)


# ---------------------------------------------------------------- today's single-file format


def test_an_old_single_file_index_still_loads_and_becomes_a_base(tmp_path):
    old = CorpusIndex.load(GOLDEN)  # written by the single-file save before segments existed
    assert old.doc_ids == ["a", "b", "ünï", "d", "e", "f"]
    want = (np.arange(24, dtype=np.float32).reshape(6, 4) / 8).astype(np.float32)
    want[2] = 0.5
    np.testing.assert_array_equal(old.embeddings, want)
    np.testing.assert_array_equal(old.versions, [1, 1, 4, 1, 3, 1])
    assert (old.index_version, old.encoder_name, old.corpus_fingerprint) == (1, "enc-old", "0123abcd" * 8)
    old.update([0], np.ones((1, 4), np.float32), 5)  # a run resumed from an old checkpoint goes on incrementally
    old.save_incremental(tmp_path, "step-000002")
    old.update([1], np.ones((1, 4), np.float32), 6)
    old.save_incremental(tmp_path, "step-000003")
    assert len(segment_files(tmp_path / "step-000003.json")) == 2
    assert_same(CorpusIndex.load_incremental(tmp_path / "step-000003.json"), old)
    old.save(tmp_path / "today.npz")  # and today's save still writes the single-file format
    assert_same(CorpusIndex.load(tmp_path / "today.npz"), old)


def test_a_pickled_index_carries_its_segments(tmp_path):
    index, rng = make_index(), np.random.default_rng(13)
    index.save_incremental(tmp_path, "a")
    copy = pickle.loads(pickle.dumps(index))
    refresh(copy, rng, 0.01, 2)
    assert len(segment_files(copy.save_incremental(tmp_path, "b"))) == 2
    assert_same(CorpusIndex.load_incremental(tmp_path / "b.json"), copy)


# ---------------------------------------------------------------- crash safety

_WRITER = r"""
import os, sys, time
import numpy as np
from searchr3_env.index import CorpusIndex

folder, mode, first, compact_above = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
n, dim, k = 20000, 64, 1000
say = lambda *a: print(*a, flush=True)
if mode == "slow-write":  # write in small slow chunks, so a kill leaves a partial temp file
    real_fdopen = os.fdopen

    class Slow:
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *a): return self.f.__exit__(*a)
        def __getattr__(self, k): return getattr(self.f, k)
        def write(self, data):
            if isinstance(data, str):
                return self.f.write(data)
            mv = memoryview(data).cast("B")
            say("writing", len(mv))
            for i in range(0, len(mv), 1 << 16):
                self.f.write(mv[i:i + (1 << 16)]); self.f.flush(); time.sleep(0.02)

    os.fdopen = lambda *a, **k: Slow(real_fdopen(*a, **k))
elif mode.startswith("slow-replace"):  # the temp file is complete, the rename has not happened
    real_replace = os.replace
    wanted = ".json" if mode == "slow-replace-manifest" else ".npz"
    def slow_replace(a, b):
        if str(b).endswith(wanted):
            say("replacing", os.path.basename(b))
            time.sleep(5)
        real_replace(a, b)
    os.replace = slow_replace

index = CorpusIndex.load_incremental(os.path.join(folder, "live.json"))
gen = first
while True:
    rows = np.random.default_rng(gen).choice(n, k, replace=False)
    index.update(rows, np.full((k, dim), gen, np.float32), gen)
    say("saving", gen)
    index.save_incremental(folder, "live", compact_above=compact_above)
    say("saved", gen)
    gen += 1
"""
N_KILL, DIM_KILL, K_KILL = 20000, 64, 1000


def replay(gens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    emb, versions = np.zeros((N_KILL, DIM_KILL), np.float32), np.zeros(N_KILL, np.int64)
    for gen in gens:
        rows = np.random.default_rng(gen).choice(N_KILL, K_KILL, replace=False)
        emb[rows], versions[rows] = gen, gen
    return emb, versions


def kill_during_save(folder: Path, mode: str, first: int, compact_above: float, rng: random.Random):
    """Start a writer, SIGKILL it during a save; (last generation reported saved, last started)."""
    trigger = "replacing" if mode.startswith("slow-replace") else {"plain": "saving", "slow-write": "writing"}[mode]
    saved, started, _ = kill_writer([_WRITER, str(folder), mode, str(first), str(compact_above)], trigger,
                                    lambda saved: mode != "plain" or saved >= first + 2,
                                    rng.uniform(0.0, 0.03) if mode == "plain" else 0.05)
    return saved, started


def test_sigkill_during_incremental_saves_leaves_the_previous_manifest_loadable(tmp_path):
    folder = tmp_path / "index"
    CorpusIndex([f"d{i}" for i in range(N_KILL)], np.zeros((N_KILL, DIM_KILL), np.float32), 0).save_incremental(
        folder, "live")
    rng = random.Random(17)
    lineage: list[int] = []  # the generations the live manifest holds, in order
    first = 1
    rounds = [("slow-replace-manifest", 0.2), ("slow-replace-segment", 0.2), ("slow-write", 0.0),
              ("slow-write", 0.2), ("plain", 0.2), ("plain", 0.2), ("plain", 0.0), ("plain", 0.2)]
    for mode, compact_above in rounds:
        saved_gen, saving_gen = kill_during_save(folder, mode, first, compact_above, rng)
        temps = [p for p in folder.iterdir() if p.name.startswith(".")]
        assert all(p.name.endswith(".tmp") for p in temps), temps
        if mode != "plain":
            assert temps, "the kill should have left a temporary"
        loaded = CorpusIndex.load_incremental(folder / "live.json")  # must load: never a torn manifest or segment
        gen = int(loaded.versions.max()) if loaded.versions.max() >= first else first - 1
        if mode == "plain":
            assert saved_gen <= gen <= saving_gen, (saved_gen, gen, saving_gen)
        else:  # killed inside the first save: the manifest from before it
            assert gen == first - 1 and saving_gen == first
        lineage += list(range(first, gen + 1))
        emb, versions = replay(lineage)
        np.testing.assert_array_equal(loaded.embeddings, emb)
        np.testing.assert_array_equal(loaded.versions, versions)
        assert loaded.index_version == len(lineage)
        names = {p.name for p in folder.iterdir()}  # the load removed the dead writer's temporaries
        assert all(n == "live.json" or n.startswith(("base-", "delta-")) for n in names), names
        first = saving_gen + 1000  # the next writer's generations are new ones
    prune_segments(folder, ["live"])
    assert {p.name for p in folder.iterdir()} == set(segment_files(folder / "live.json")) | {"live.json"}
    np.testing.assert_array_equal(CorpusIndex.load_incremental(folder / "live.json").embeddings, replay(lineage)[0])
