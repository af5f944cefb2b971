"""Where judgments live: SQLite by default (one file in WAL mode, safe under concurrent labellers, each judgment
committed in its own transaction so that a crash loses nothing already answered), or any database SQLAlchemy reaches
by URL (`postgresql+psycopg://...`, `mysql+pymysql://...`).

An item is what a labeller sees: a prompt and two or four images (each with the system that made it, for win rates
and Elo); a judgment is one labeller's answer on it: `"left"`, `"right"`, `"tie"` or `"both_bad"` for two images,
or a ranking (best first) for four.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from .stats import CHOICES, Judgment

#: Pick-a-Pic's columns, in the order :meth:`JudgmentStore.export_pickapic` writes them.
PICKAPIC_COLUMNS = (
    "caption",
    "jpg_0",
    "jpg_1",
    "label_0",
    "label_1",
    "model_0",
    "model_1",
    "user_id",
    "image_0_uid",
    "image_1_uid",
    "best_image_uid",
    "are_different",
    "has_label",
    "ranking_id",
    "created_at",
)


def _sqlalchemy():
    try:
        import sqlalchemy
    except ImportError:
        raise ImportError(
            "The judgment store needs SQLAlchemy: pip install 'ttalign[preferences]' (or sqlalchemy>=2)."
        ) from None
    return sqlalchemy


class JudgmentStore:
    """Items to label and the judgments on them, in a database.

    Args:
        url (`str`, defaults to `"sqlite:///judgments.db"`): a SQLAlchemy database URL, or a plain file path (taken
            as a SQLite file).

    Example:

    ```py
    >>> store = JudgmentStore("sqlite:///labels.db")
    >>> item = store.add_item("a red circle", ["a.png", "b.png"], systems=["base", "dpo"])
    >>> store.record(item, labeller="ana", choice="left")
    >>> store.judgments()  # Judgment records for win_rates / elo_ratings
    ```
    """

    def __init__(self, url: str = "sqlite:///judgments.db"):
        sa = _sqlalchemy()
        if "://" not in url:
            url = f"sqlite:///{url}"
        self.url = url
        self.engine = sa.create_engine(url)
        if self.engine.dialect.name == "sqlite":

            @sa.event.listens_for(self.engine, "connect")
            def _pragmas(connection, _record):
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
                cursor.execute("PRAGMA synchronous=FULL")  # a committed judgment survives a crash
                cursor.execute("PRAGMA busy_timeout=30000")  # concurrent writers wait instead of failing
                cursor.close()

        meta = sa.MetaData()
        self.items = sa.Table(
            "items",
            meta,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("prompt", sa.Text, nullable=False),
            sa.Column("images", sa.Text, nullable=False),  # JSON list of image references (paths or ids)
            sa.Column("systems", sa.Text, nullable=False),  # JSON list: the system that made each image
            sa.Column("source", sa.Text, nullable=False, default=""),
            sa.Column("created", sa.Float, nullable=False),
        )
        self.table = sa.Table(
            "judgments",
            meta,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("item_id", sa.Integer, sa.ForeignKey("items.id"), nullable=False, index=True),
            sa.Column("labeller", sa.Text, nullable=False, index=True),
            sa.Column("choice", sa.Text, nullable=True),  # two images: left / right / tie / both_bad
            sa.Column("ranking", sa.Text, nullable=True),  # four images: JSON list of positions, best first
            sa.Column("created", sa.Float, nullable=False),
        )
        meta.create_all(self.engine)
        self._sa = sa

    # --- items ------------------------------------------------------------------------------------------------------

    def add_item(self, prompt: str, images: Sequence[str], systems: Sequence[str] | None = None, source: str = ""):
        """Adds an item of two or four images of `prompt` (their references: paths or ids) and returns its id;
        `systems` names what made each image (default: `"0"`, `"1"`, ...)."""
        images = [str(i) for i in images]
        if len(images) not in (2, 4):
            raise ValueError(f"An item shows two or four images, got {len(images)}.")
        systems = [str(s) for s in systems] if systems is not None else [str(i) for i in range(len(images))]
        if len(systems) != len(images):
            raise ValueError(f"Got {len(systems)} systems for {len(images)} images.")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"An item needs a prompt, got {prompt!r}.")
        row = dict(prompt=prompt, images=json.dumps(images), systems=json.dumps(systems), source=source)
        with self.engine.begin() as connection:
            result = connection.execute(self.items.insert().values(**row, created=time.time()))
            return int(result.inserted_primary_key[0])

    def item(self, item_id: int) -> dict:
        """The item `item_id`: `{"id", "prompt", "images", "systems", "source"}`; `KeyError` when there is none."""
        with self.engine.connect() as connection:
            row = connection.execute(self.items.select().where(self.items.c.id == item_id)).mappings().first()
        if row is None:
            raise KeyError(f"No item {item_id!r}.")
        return self._item(row)

    @staticmethod
    def _item(row) -> dict:
        return {
            "id": int(row["id"]),
            "prompt": row["prompt"],
            "images": json.loads(row["images"]),
            "systems": json.loads(row["systems"]),
            "source": row["source"],
        }

    def next_item(self, labeller: str) -> dict | None:
        """An item `labeller` has not judged, the least-judged first (then the oldest); `None` when none is left."""
        sa = self._sa
        counts = sa.select(self.table.c.item_id, sa.func.count().label("n")).group_by(self.table.c.item_id).subquery()
        mine = sa.select(self.table.c.item_id).where(self.table.c.labeller == labeller)
        query = (
            sa.select(self.items)
            .outerjoin(counts, counts.c.item_id == self.items.c.id)
            .where(self.items.c.id.not_in(mine))
            .order_by(sa.func.coalesce(counts.c.n, 0), self.items.c.id)
            .limit(1)
        )
        with self.engine.connect() as connection:
            row = connection.execute(query).mappings().first()
        return None if row is None else self._item(row)

    def progress(self, labeller: str) -> dict:
        """`{"done": items this labeller judged, "total": items}`."""
        sa = self._sa
        with self.engine.connect() as connection:
            total = connection.execute(sa.select(sa.func.count()).select_from(self.items)).scalar_one()
            done = connection.execute(
                sa.select(sa.func.count(sa.distinct(self.table.c.item_id))).where(self.table.c.labeller == labeller)
            ).scalar_one()
        return {"done": int(done), "total": int(total)}

    # --- judgments --------------------------------------------------------------------------------------------------

    def record(
        self, item_id: int, labeller: str, choice: str | None = None, ranking: Sequence[int] | None = None
    ) -> int:
        """Stores one judgment in its own transaction and returns its id: `choice` for a two-image item, `ranking`
        (the positions of the four images, best first) for a four-image one."""
        item = self.item(item_id)
        if not isinstance(labeller, str) or not labeller.strip():
            raise ValueError(f"A judgment needs a labeller, got {labeller!r}.")
        if len(item["images"]) == 2:
            if choice not in CHOICES or ranking is not None:
                raise ValueError(f"A two-image item takes a choice in {CHOICES}, got {choice!r}, ranking {ranking!r}.")
        else:
            if choice is not None or ranking is None or sorted(ranking) != [0, 1, 2, 3]:
                raise ValueError(f"A four-image item takes a ranking of 0, 1, 2, 3, got {ranking!r}.")
        row = dict(
            item_id=item_id,
            labeller=labeller,
            choice=choice,
            ranking=None if ranking is None else json.dumps([int(r) for r in ranking]),
            created=time.time(),
        )
        with self.engine.begin() as connection:
            return int(connection.execute(self.table.insert().values(**row)).inserted_primary_key[0])

    def rows(self) -> list[dict]:
        """Every judgment with its item: `{"id", "item", "labeller", "choice", "ranking", "created"}`."""
        with self.engine.connect() as connection:
            judgments = connection.execute(self.table.select().order_by(self.table.c.id)).mappings().all()
            items = {r["id"]: self._item(r) for r in connection.execute(self.items.select()).mappings()}
        return [
            {
                "id": int(j["id"]),
                "item": items[j["item_id"]],
                "labeller": j["labeller"],
                "choice": j["choice"],
                "ranking": None if j["ranking"] is None else json.loads(j["ranking"]),
                "created": j["created"],
            }
            for j in judgments
        ]

    def judgments(self) -> list[Judgment]:
        """The judgments as pairwise :class:`~ttalign.preferences.Judgment` records between the systems: a two-image
        judgment as it is, a ranking of four as the six pairs it orders (Plackett-Luce's pairwise reading)."""
        out = []
        for row in self.rows():
            item = row["item"]
            prompt, systems = item["prompt"], item["systems"]
            if row["ranking"] is None:
                if systems[0] != systems[1]:
                    out.append(Judgment(prompt, systems[0], systems[1], row["choice"]))
                continue
            order = row["ranking"]
            for a in range(4):
                for b in range(a + 1, 4):
                    better, worse = order[a], order[b]
                    if systems[better] != systems[worse]:
                        out.append(Judgment(prompt, systems[better], systems[worse], "left"))
        return out

    def export_pickapic(self, path: str, images_root: str = ".") -> int:
        """Writes the two-image judgments to a parquet file in Pick-a-Pic's column layout (`caption`, `jpg_0`,
        `jpg_1` as encoded image bytes, `label_0` / `label_1`: 1 / 0 for a winner, 0.5 / 0.5 for a tie or both bad,
        `model_0` / `model_1`, `user_id`, `image_0_uid` / `image_1_uid`, `best_image_uid`, `are_different`,
        `has_label`, `ranking_id`, `created_at`), written to a temporary file and renamed into place; returns the
        number of rows. Image references are read relative to `images_root`."""
        import os

        import pyarrow as pa
        import pyarrow.parquet as pq

        columns: dict[str, list] = {k: [] for k in PICKAPIC_COLUMNS}
        for row in self.rows():
            item = row["item"]
            if row["ranking"] is not None:
                continue
            data = []
            for ref in item["images"]:
                file = os.path.join(images_root, ref)
                if not os.path.isfile(file):
                    raise ValueError(f"Item {item['id']}: image {ref!r} is not a file under {images_root!r}.")
                with open(file, "rb") as f:
                    data.append(f.read())
            label_0 = {"left": 1.0, "right": 0.0}.get(row["choice"], 0.5)
            best = {"left": item["images"][0], "right": item["images"][1]}.get(row["choice"], "")
            values = (
                item["prompt"],
                *data,
                label_0,
                1.0 - label_0,
                *item["systems"],
                row["labeller"],
                *item["images"],
                best,
                item["images"][0] != item["images"][1],
                True,
                row["id"],
                row["created"],
            )
            for key, value in zip(PICKAPIC_COLUMNS, values):
                columns[key].append(value)
        table = pa.table(columns)
        tmp = f"{path}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return table.num_rows

    def training_records(self, images_root: str = ".") -> tuple[list, list]:
        """`(pairs, rankings)` for :class:`~ttalign.preferences.reward_training.RewardTrainer`: each two-image
        judgment as a :class:`~ttalign.rewards.evaluation.PreferencePair` (both bad: a tie), each four-image one as a
        :class:`~ttalign.preferences.reward_training.Ranking`, images read relative to `images_root`."""
        import os

        from PIL import Image

        from ttalign.rewards.evaluation import PreferencePair

        from .reward_training import Ranking

        def load(ref, item):
            file = os.path.join(images_root, ref)
            if not os.path.isfile(file):
                raise ValueError(f"Item {item['id']}: image {ref!r} is not a file under {images_root!r}.")
            return Image.open(file).convert("RGB")

        pairs, rankings = [], []
        for row in self.rows():
            item = row["item"]
            images = [load(ref, item) for ref in item["images"]]
            if row["ranking"] is None:
                label = {"left": 0.0, "right": 1.0}.get(row["choice"], 0.5)
                pairs.append(PreferencePair(item["prompt"], images[0], images[1], label))
            else:
                rankings.append(Ranking(item["prompt"], images, row["ranking"]))
        return pairs, rankings
