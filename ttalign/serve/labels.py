"""The labelling side of the server: people judge images in the browser (`GET /label`), their answers go to a
:class:`~ttalign.preferences.JudgmentStore`.

Items come from an image folder and an items file the operator names at start-up (`--label-images DIR
--label-items FILE`, a JSON-lines file of `{"prompt", "images": [two or four file names in DIR], "systems": [what
made each], "source"}`), imported once (an item already in the store is not added again). A request names an item by
its id and an image by its position, never a path; a labeller by a short name.
"""

from __future__ import annotations

import json
import os
import re

from .protocol import APIError

LABELLER = re.compile(r"[A-Za-z0-9 _.@-]{1,64}")
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


class LabelService:
    """Items and judgments for the labelling page.

    Args:
        url (`str`): the judgment store's database URL (or a SQLite file path).
        images (`str`): the folder the items' images are in.
        items (`str`, *optional*): a JSON-lines items file to import.
    """

    def __init__(self, url: str, images: str, items: str | None = None):
        from ttalign.preferences import JudgmentStore

        if not os.path.isdir(images):
            raise ValueError(f"--label-images must be a folder, got {images!r}.")
        self.store = JudgmentStore(url)
        self.root = os.path.realpath(images)
        if items:
            self.import_items(items)

    def import_items(self, path: str) -> int:
        """Adds the file's items that the store does not hold yet; returns how many were added. A malformed line is
        a `ValueError` naming it."""
        if not os.path.isfile(path):
            raise ValueError(f"--label-items must be a file, got {path!r}.")
        known = {(r["prompt"], tuple(r["images"])) for r in self._items()}
        added = 0
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}, line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: not JSON ({err.msg}).") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise ValueError(f"{where}: an item needs a prompt and its images, got {line.strip()[:200]!r}.")
                images = record.get("images")
                if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                    raise ValueError(f"{where}: images must be a list of file names.")
                for name in images:
                    self._file(name, where)
                if (record["prompt"], tuple(images)) in known:
                    continue
                self.store.add_item(record["prompt"], images, record.get("systems"), str(record.get("source", "")))
                known.add((record["prompt"], tuple(images)))
                added += 1
        return added

    def _items(self) -> list[dict]:
        with self.store.engine.connect() as connection:
            rows = connection.execute(self.store.items.select()).mappings().all()
        return [self.store._item(r) for r in rows]

    def _file(self, name: str, where: str) -> str:
        """The image file `name` inside the images folder (no way out of it)."""
        path = os.path.realpath(os.path.join(self.root, name))
        if os.path.commonpath([path, self.root]) != self.root or not os.path.isfile(path):
            raise ValueError(f"{where}: image {name!r} is not a file in the images folder.")
        if os.path.splitext(path)[1].lower() not in IMAGE_TYPES:
            raise ValueError(f"{where}: image {name!r} is not a PNG, JPEG or WebP file.")
        return path

    # --- what the routes call (blocking: run them in a thread) ---------------------------------------------------

    @staticmethod
    def labeller(value) -> str:
        if not isinstance(value, str) or not LABELLER.fullmatch(value):
            raise APIError(400, "labeller must be 1-64 letters, digits, spaces or . _ @ -.", code="invalid_value")
        return value

    def next(self, labeller: str) -> dict:
        """The next item for `labeller` (or `None`) with its image URLs, and the labeller's progress."""
        item = self.store.next_item(self.labeller(labeller))
        body = {"item": None, "progress": self.store.progress(labeller)}
        if item is not None:
            body["item"] = {
                "id": item["id"],
                "prompt": item["prompt"],
                "images": [f"/v1/label/items/{item['id']}/images/{k}" for k in range(len(item["images"]))],
            }
        return body

    def image(self, item_id: int, index: int) -> tuple[str, str]:
        """`(file, media type)` of an item's image; 404 when there is none."""
        try:
            item = self.store.item(item_id)
        except KeyError:
            raise APIError(404, f"No item {item_id}.", code="not_found") from None
        if not 0 <= index < len(item["images"]):
            raise APIError(404, f"Item {item_id} has no image {index}.", code="not_found")
        try:
            path = self._file(item["images"][index], f"item {item_id}")
        except ValueError as err:
            raise APIError(404, str(err), code="not_found") from None
        return path, IMAGE_TYPES[os.path.splitext(path)[1].lower()]

    def record(self, item_id: int, body) -> dict:
        """Stores a judgment from a request body `{"labeller", "choice"}` or `{"labeller", "ranking"}`."""
        if not isinstance(body, dict) or set(body) - {"labeller", "choice", "ranking"}:
            raise APIError(400, "A judgment is {labeller, choice} or {labeller, ranking}.", code="invalid_value")
        labeller = self.labeller(body.get("labeller"))
        ranking = body.get("ranking")
        if ranking is not None and (not isinstance(ranking, list) or not all(type(r) is int for r in ranking)):
            raise APIError(400, "ranking must be a list of image positions.", code="invalid_value")
        try:
            judgment = self.store.record(item_id, labeller, body.get("choice"), ranking)
        except KeyError:
            raise APIError(404, f"No item {item_id}.", code="not_found") from None
        except ValueError as err:
            raise APIError(400, str(err), code="invalid_value") from None
        return {"id": judgment, "progress": self.store.progress(labeller)}
