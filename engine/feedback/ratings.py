"""Ratings of generated images: stored in <data_dir>/stylebooth.db next to the library, with the image's full
recipe (style version, prompt, seed, settings), its owner, time and tags.

An image is referenced by the engine's own output record: a PNG under outputs/<user>/ that carries our recipe.
A client path outside the rater's own outputs folder is refused, never opened. One rating per (user, image):
rating again changes it. Ratings are 1..5 (thumbs down = 1, thumbs up = 5); 4-5 count as liked, 1-2 as disliked.

The `ratings` table has its own schema version (table `feedback_schema`), so the library's migrations and these
never step on each other.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.core.errors import ConfigError

SCHEMA_VERSION = 3  # of the tables
EXPORT_SCHEMA = 1  # of the exported JSON document
THUMBS_UP, THUMBS_DOWN = 5, 1
MAX_TAGS = 16
_V1 = """
CREATE TABLE ratings (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    user          TEXT NOT NULL,
    image         TEXT NOT NULL,   -- relative to the data dir: outputs/<user>/...
    style_id      TEXT NOT NULL,   -- '' for an image made without a style
    style_version INTEGER NOT NULL,
    prompt        TEXT NOT NULL,
    seed          INTEGER NOT NULL,
    recipe        TEXT NOT NULL,   -- the PNG's full recipe (JSON)
    rating        INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5),
    tags          TEXT NOT NULL,   -- JSON list
    created       TEXT NOT NULL,
    updated       TEXT NOT NULL,
    UNIQUE (user, image)
);
CREATE INDEX ratings_by_style ON ratings(style_id, style_version);
"""
# v2: a version's hand-set defaults (overall strength, UNet vs text-encoder weight), applied whenever it is used.
_V2 = """
CREATE TABLE version_defaults (
    style_id      TEXT NOT NULL,
    version       INTEGER NOT NULL,
    strength      REAL NOT NULL,
    unet_weight   REAL NOT NULL,
    te_weight     REAL NOT NULL,
    updated       TEXT NOT NULL,
    PRIMARY KEY (style_id, version)
);
"""
# v3: per-block UNet weights (down / mid / up blocks, diffusers' set_adapters block scales); 1.0 for old rows.
_V3 = """
ALTER TABLE version_defaults ADD COLUMN block_down REAL NOT NULL DEFAULT 1.0;
ALTER TABLE version_defaults ADD COLUMN block_mid REAL NOT NULL DEFAULT 1.0;
ALTER TABLE version_defaults ADD COLUMN block_up REAL NOT NULL DEFAULT 1.0
"""
MIGRATIONS = {1: _V1, 2: _V2, 3: _V3}
WEIGHT_RANGE = (0.0, 2.0)
BLOCKS = ("down", "mid", "up")  # the UNet's parts, in diffusers' block-scale names
NO_BLOCKS = {b: 1.0 for b in BLOCKS}


@dataclass(frozen=True)
class Rating:
    id: int
    user: str
    image: str
    style_id: str
    style_version: int
    prompt: str
    seed: int
    recipe: dict
    rating: int
    tags: tuple[str, ...]
    created: str
    updated: str

    @property
    def liked(self) -> bool:
        return self.rating >= 4

    @property
    def disliked(self) -> bool:
        return self.rating <= 2

    @property
    def weight(self) -> float:
        """How much a liked image counts in refinement: 5 -> 1.0, 4 -> 0.5, else 0."""
        return max(0.0, (self.rating - 3) / 2)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def clean_rating(rating) -> int:
    """1..5, or "up"/"down" (thumbs), or True/False."""
    if isinstance(rating, str) and rating.strip().lower() in ("up", "down", "👍", "👎"):
        return THUMBS_UP if rating.strip().lower() in ("up", "👍") else THUMBS_DOWN
    if isinstance(rating, bool):
        return THUMBS_UP if rating else THUMBS_DOWN
    if not isinstance(rating, int) or not 1 <= rating <= 5:
        raise ConfigError(f"a rating is 1..5 stars or 'up'/'down', not {str(rating)[:20]!r}")
    return rating


def _check_weight(name: str, v) -> None:
    lo, hi = WEIGHT_RANGE
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ConfigError(f"`{name}` must be a number from {lo} to {hi} but is {str(v)[:20]!r}")


def clean_blocks(blocks) -> dict:
    """Per-block UNet weights {"down", "mid", "up"}, each 0..2 (a missing block: 1.0; None: all 1.0).

    The names are diffusers' block scales (`set_adapters` with {"unet": {"down": .., "mid": .., "up": ..}}): the
    LoRA's layers in the UNet's down blocks (the encoder: layout, what is where), its middle block (the most
    compressed, global content) and its up blocks (the decoder: textures, colours, line work, the look)."""
    if blocks is None:
        return dict(NO_BLOCKS)
    if not isinstance(blocks, dict):
        raise ConfigError(f"per-block weights are {{'down': w, 'mid': w, 'up': w}}, not {str(blocks)[:40]!r}")
    unknown = set(blocks) - set(BLOCKS)
    if unknown:
        raise ConfigError(f"per-block weights take 'down', 'mid' and 'up', not {sorted(map(str, unknown))[:3]}")
    for b, v in blocks.items():
        _check_weight(f"{b} block weight", v)
    return {b: float(blocks.get(b, 1.0)) for b in BLOCKS}


def clean_tags(tags) -> tuple[str, ...]:
    if isinstance(tags, str):
        tags = tags.split(",")
    out = []
    for t in tags or ():
        t = " ".join(str(t).lower().split())[:40]
        if t and t not in out:
            out.append(t)
    if len(out) > MAX_TAGS:
        raise ConfigError(f"at most {MAX_TAGS} tags per rating, not {len(out)}")
    return tuple(out)


class Ratings:
    """The ratings table on the library's Database connection (engine.styles.db.Database)."""

    def __init__(self, db, data_dir: Path):
        self.db, self.data_dir = db, Path(data_dir)
        with db.transaction() as con:
            con.execute("CREATE TABLE IF NOT EXISTS feedback_schema (version INTEGER NOT NULL)")
            row = con.execute("SELECT version FROM feedback_schema").fetchone()
            current = row[0] if row else 0
            if current > SCHEMA_VERSION:
                raise ConfigError(f"the ratings table has schema {current}; this Stylebooth knows {SCHEMA_VERSION}")
            for n in range(current + 1, SCHEMA_VERSION + 1):
                for stmt in MIGRATIONS[n].split(";"):
                    if stmt.strip():
                        con.execute(stmt)
            con.execute("DELETE FROM feedback_schema")
            con.execute("INSERT INTO feedback_schema (version) VALUES (?)", (SCHEMA_VERSION,))

    def resolve_image(self, image, user: str) -> Path:
        """The PNG a client names, only if it lies in outputs/<user>/ (a path or a path relative to the data dir)."""
        own = (self.data_dir / "outputs" / user).resolve()
        p = Path(str(image))
        p = (p if p.is_absolute() else self.data_dir / p).resolve()
        if not p.is_relative_to(own) or p.suffix.lower() != ".png" or not p.is_file():
            raise ConfigError("rate an image this app generated for you (from the gallery); that file is not one "
                              "of your outputs")
        return p

    def rate(self, image, rating, tags=(), user: str = "local") -> Rating:
        """Add or change `user`'s rating of one generated image; the recipe is read from the PNG itself."""
        from engine.generate.recipes import read_recipe

        path = self.resolve_image(image, user)
        recipe = read_recipe(path)
        if not recipe or "prompt" not in recipe or "seed" not in recipe:
            raise ConfigError("that image carries no Stylebooth recipe, so it cannot be rated")
        styles = recipe.get("styles") or []
        sid, ver = (str(styles[0].get("id", "")), int(styles[0].get("version", 0))) if styles else ("", 0)
        rel, now = path.relative_to(self.data_dir.resolve()).as_posix(), _now()
        value, tags = clean_rating(rating), clean_tags(tags)
        with self.db.transaction() as con:
            con.execute(
                "INSERT INTO ratings (user, image, style_id, style_version, prompt, seed, recipe, rating, tags, "
                "created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(user, image) DO UPDATE SET "
                "rating=excluded.rating, tags=excluded.tags, updated=excluded.updated",
                (user, rel, sid, ver, str(recipe["prompt"]), int(recipe["seed"]), json.dumps(recipe), value,
                 json.dumps(list(tags)), now, now))
        return self.get(rel, user)

    def get(self, image: str, user: str) -> Rating:
        rows = self.db.query("SELECT * FROM ratings WHERE user=? AND image=?", (user, image))
        if not rows:
            raise ConfigError("that image has no rating")
        return _row(rows[0])

    def remove(self, image, user: str = "local") -> bool:
        """Remove `user`'s rating of an image; False if there was none."""
        rel = self.resolve_image(image, user).relative_to(self.data_dir.resolve()).as_posix()
        with self.db.transaction() as con:
            return con.execute("DELETE FROM ratings WHERE user=? AND image=?", (user, rel)).rowcount > 0

    def list(self, style_id: str | None = None, version: int | None = None, *, user: str | None = None) -> list[Rating]:
        """Ratings, oldest first, filtered by style (and version) and owner."""
        where, args = [], []
        for col, val in (("style_id", style_id), ("style_version", version), ("user", user)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        sql = "SELECT * FROM ratings" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        return [_row(r) for r in self.db.query(sql, tuple(args))]

    def set_defaults(self, style_id: str, version: int, strength: float = 1.0, unet_weight: float = 1.0,
                     te_weight: float = 1.0, blocks: dict | None = None) -> dict:
        """Save a version's defaults: its LoRA is applied at strength·unet_weight on the UNet and
        strength·te_weight on the text encoder (times the strength a request asks for), and on the UNet's down /
        mid / up blocks additionally times `blocks` (clean_blocks; None keeps 1.0 each)."""
        for name, v in (("strength", strength), ("unet_weight", unet_weight), ("te_weight", te_weight)):
            _check_weight(name, v)
        b = clean_blocks(blocks)
        with self.db.transaction() as con:
            con.execute("INSERT OR REPLACE INTO version_defaults (style_id, version, strength, unet_weight, "
                        "te_weight, block_down, block_mid, block_up, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (style_id, int(version), float(strength), float(unet_weight), float(te_weight), b["down"],
                         b["mid"], b["up"], _now()))
        return self.defaults(style_id, version)

    def defaults(self, style_id: str, version: int) -> dict:
        """{"strength", "unet_weight", "te_weight", "blocks": {"down", "mid", "up"}} of a version (1.0 each when
        never set)."""
        rows = self.db.query("SELECT strength, unet_weight, te_weight, block_down, block_mid, block_up FROM "
                             "version_defaults WHERE style_id=? AND version=?", (style_id, int(version)))
        if not rows:
            return {"strength": 1.0, "unet_weight": 1.0, "te_weight": 1.0, "blocks": dict(NO_BLOCKS)}
        r = dict(rows[0])
        return {"strength": r["strength"], "unet_weight": r["unet_weight"], "te_weight": r["te_weight"],
                "blocks": {b: r[f"block_{b}"] for b in BLOCKS}}

    def export(self, style_id: str | None = None, *, user: str | None = None) -> str:
        """The ratings as a JSON document (schema_version, ratings with recipes)."""
        rows = [asdict(r) for r in self.list(style_id, user=user)]
        return json.dumps({"schema_version": EXPORT_SCHEMA, "ratings": rows}, indent=1)


def _row(r) -> Rating:
    return Rating(r["id"], r["user"], r["image"], r["style_id"], r["style_version"], r["prompt"], r["seed"],
                  json.loads(r["recipe"]), r["rating"], tuple(json.loads(r["tags"])), r["created"], r["updated"])
