"""The judgment store: items and judgments in SQLite (WAL) through SQLAlchemy, least-judged items first, rankings
read as pairs, concurrent writers in separate processes, and the export to Pick-a-Pic's layout read back."""

import multiprocessing
import os

import numpy as np
import pytest
from PIL import Image

from ttalign.preferences import elo_ratings
from ttalign.preferences.readers import read_pickapic
from ttalign.preferences.store import PICKAPIC_COLUMNS, JudgmentStore


def _image(path, value):
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return os.path.basename(path)


def test_items_judgments_progress_and_rankings(tmp_path):
    store = JudgmentStore(str(tmp_path / "labels.db"))  # a plain path is a SQLite file
    assert store.url.startswith("sqlite:///")
    first = store.add_item("a red circle", ["a.png", "b.png"], systems=["base", "dpo"])
    four = ["c.png", "d.png", "e.png", "f.png"]
    second = store.add_item("a blue square", four, systems=["base", "dpo", "raft", "x"])
    assert store.next_item("ana")["id"] == first
    store.record(first, "ana", choice="right")
    assert store.next_item("ana")["id"] == second and store.next_item("ben")["id"] == second  # least judged first
    store.record(second, "ben", ranking=[2, 1, 0, 3])
    assert store.progress("ana") == {"done": 1, "total": 2} and store.next_item("ben")["id"] == first
    judgments = store.judgments()
    assert [(j.left, j.right, j.choice) for j in judgments][:1] == [("base", "dpo", "right")]
    assert len(judgments) == 1 + 6  # a ranking of four orders six pairs
    assert ("raft", "dpo", "left") in [(j.left, j.right, j.choice) for j in judgments]
    ratings = elo_ratings(judgments, bootstrap=20)
    assert ratings["raft"]["elo"] > ratings["base"]["elo"]
    with pytest.raises(ValueError, match="two-image item"):
        store.record(first, "ana", choice="best")
    with pytest.raises(ValueError, match="ranking of 0, 1, 2, 3"):
        store.record(second, "ana", ranking=[0, 1, 2])
    with pytest.raises(ValueError, match="two or four"):
        store.add_item("p", ["a", "b", "c"])
    with pytest.raises(KeyError):
        store.record(99, "ana", choice="left")
    with pytest.raises(ValueError, match="labeller"):
        store.record(first, " ", choice="left")
    with store.engine.connect() as connection:  # WAL: labellers read while one writes
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def _writer(url, item_ids, labeller, queue):
    store = JudgmentStore(url)
    done = 0
    for item in item_ids:
        store.record(item, labeller, choice="left" if item % 2 else "tie")
        done += 1
    queue.put(done)


def test_concurrent_labellers_in_separate_processes_lose_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'labels.db'}"
    store = JudgmentStore(url)
    items = [store.add_item(f"prompt {i}", ["a.png", "b.png"], systems=["s", "t"]) for i in range(40)]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_writer, args=(url, items, f"labeller {k}", queue)) for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    assert sorted(queue.get() for _ in workers) == [40] * 4
    rows = store.rows()
    assert len(rows) == 160 and len({r["id"] for r in rows}) == 160
    assert all(store.progress(f"labeller {k}") == {"done": 40, "total": 40} for k in range(4))


def test_export_to_pickapic_reads_back(tmp_path):
    store = JudgmentStore(f"sqlite:///{tmp_path / 'labels.db'}")
    names = [_image(tmp_path / f"{i}.png", 40 * i) for i in range(4)]
    a = store.add_item("a red circle", names[:2], systems=["base", "dpo"])
    b = store.add_item("a blue square", names[2:], systems=["base", "dpo"])
    store.record(a, "ana", choice="right")
    store.record(b, "ana", choice="both_bad")
    out = tmp_path / "export.parquet"
    assert store.export_pickapic(str(out), images_root=str(tmp_path)) == 2
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert table.column_names == list(PICKAPIC_COLUMNS)
    assert table.column("label_0").to_pylist() == [0.0, 0.5] and table.column("model_1").to_pylist() == ["dpo"] * 2
    pairs = read_pickapic(str(out))
    assert [(p.prompt, p.label) for p in pairs] == [("a red circle", 1.0), ("a blue square", 0.5)]
    assert np.asarray(pairs[0].image_1).mean() == pytest.approx(40)
    assert len(read_pickapic(str(tmp_path), keep_ties=False)) == 1  # a folder of parquet files
    with pytest.raises(ValueError, match="not a file"):
        store.export_pickapic(str(tmp_path / "x.parquet"), images_root=str(tmp_path / "elsewhere"))
    assert not (tmp_path / "x.parquet").exists()
