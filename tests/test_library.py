"""The style library (SQLite): restart-safe operations, trash with undo, adoption of v1 folders, migrations,
name collisions, base-model flags, and publish from training landing in the list with no extra step."""
from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest

from engine.core.errors import LibraryError
from engine.styles import db as D
from engine.styles.library import Library, base_model_mismatch
from engine.styles.store import publish


def _publish(data: Path, tmp: Path, name: str, *, trigger="olis", preset="subject", created="2026-01-01T00:00:00",
             fingerprint="fp-a") -> object:
    lora = tmp / "l.safetensors"
    lora.write_bytes(b"weights")
    meta = tmp / "style.json"
    meta.write_text(json.dumps({"schema_version": 1, "trigger_token": trigger, "preset": preset, "created": created,
                                "base_model": "demo", "base_model_fingerprint": fingerprint,
                                "instance_prompt": f"a photo of {trigger} shape",
                                "training_config": {"class_prompt": "a photo of a shape", "lora_rank": 4},
                                "training_images": [{"name": "a.png", "sha256": "ab" * 32}]}))
    return publish(data, name, lora, meta)


def _v1_folder(data: Path, style_id: str, meta: dict | str) -> Path:
    """A styles/<id>/v1 folder as store.py wrote them before the library existed."""
    folder = data / "styles" / style_id / "v1"
    folder.mkdir(parents=True)
    (folder / "lora.safetensors").write_bytes(b"w")
    (folder / "style.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return folder


def test_publish_appears_in_the_library_and_survives_a_restart(tmp_path):
    data = tmp_path / "data"
    a = _publish(data, tmp_path, "Heart", created="2026-01-01T00:00:00")
    b = _publish(data, tmp_path, "Checkers", trigger="zwx", preset="style", created="2026-01-02T00:00:00")
    lib = Library(data)
    assert [s.id for s in lib.list()] == [b.id, a.id]
    lib.rename(a.id, "Red heart")
    lib.set_tags(a.id, "Shapes, red ,shapes")
    lib.describe(a.id, "a heart, learned from 4 images")
    lib.archive(b.id)
    v = lib.versions(a.id)[0]
    assert lib.file_hashes(a.id, 1).keys() == {"lora.safetensors", "style.json"}
    lib.close()

    lib = Library(data)  # a restart: a new Library object on the same database
    s = lib.get(a.id)
    assert (s.name, s.tags, s.description) == ("Red heart", ("red", "shapes"), "a heart, learned from 4 images")
    assert s.latest.trigger_token == "olis" and s.latest.class_noun == "shape" and s.latest.version == 1
    assert s.latest.lora.read_bytes() == b"weights" and s.latest.folder == v.folder
    assert [x.id for x in lib.list()] == [a.id]  # archived styles are hidden by default...
    assert [x.id for x in lib.list(archived=True)] == [b.id]  # ...and listed on their own
    assert [x.latest.id for x in lib.list(archived=None)] == [b.id, a.id]
    assert [x.id for x in lib.active()] == [a.id]
    lib.close()


def test_search_by_name_tag_trigger_and_filters(tmp_path):
    data = tmp_path / "data"
    a = _publish(data, tmp_path, "Heart", trigger="olis")
    b = _publish(data, tmp_path, "Checkers", trigger="zwx", preset="style")
    lib = Library(data)
    lib.set_tags(b.id, ["pattern"])
    assert [s.id for s in lib.list("HEAR")] == [a.id]
    assert [s.id for s in lib.list("zw")] == [b.id]  # trigger substring
    assert [s.id for s in lib.list("patt")] == [b.id]  # tag substring
    assert [s.id for s in lib.list(tag="pattern")] == [b.id]
    assert [s.id for s in lib.list(preset="subject")] == [a.id]
    assert lib.list("nothing like this") == []


def test_delete_then_undo_restores_the_style_with_its_versions(tmp_path):
    data = tmp_path / "data"
    a = _publish(data, tmp_path, "Heart")
    lib = Library(data)
    # a second version, as refinement will add them
    v2 = lib.next_version_folder(a.id)
    v2.mkdir()
    (v2 / "lora.safetensors").write_bytes(b"w2")
    (v2 / "style.json").write_text(json.dumps({"schema_version": 1, "trigger_token": "olis", "preset": "subject"}))
    lib.register_folder(v2)
    lib.delete(a.id)
    assert lib.list() == [] and [s.id for s in lib.list(trashed=True)] == [a.id]
    with pytest.raises(LibraryError, match="in the trash"):
        lib.find_version(a.id)
    lib.close()
    lib = Library(data)  # the trash survives a restart, and adoption does not resurrect trashed folders
    assert lib.list() == [] and lib.last_adoption.adopted == ()
    s = lib.undo_delete(a.id)
    assert [v.version for v in s.versions] == [1, 2] and lib.find_version(a.id).version == 2
    assert lib.find_version(f"{a.id}@v1").lora.read_bytes() == b"weights"
    lib.delete(a.id)
    assert lib.empty_trash() == 1
    assert not (data / "styles" / a.id).exists() and not list((data / "styles").iterdir())
    with pytest.raises(LibraryError, match="unknown style"):
        lib.undo_delete(a.id)
    assert Library(data).list(archived=None) == []  # nothing comes back from the folders either


def test_two_styles_with_one_name_are_distinguishable(tmp_path):
    data = tmp_path / "data"
    a, b = _publish(data, tmp_path, "Heart"), _publish(data, tmp_path, "Heart")
    assert a.id != b.id and a.label != b.label
    assert a.id in a.label and "v1" in a.label
    lib = Library(data)
    assert sorted(s.label for s in lib.list()) == sorted([a.label, b.label])
    lib.rename(b.id, "Heart")
    assert lib.find_version(b.id).id == b.id


def test_ids_from_clients_are_looked_up_never_used_as_paths(tmp_path):
    data = tmp_path / "data"
    _publish(data, tmp_path, "Heart")
    lib = Library(data)
    for bad in ("../../etc/passwd", "/etc", "x' OR 1=1 --", "", "A" * 200):
        with pytest.raises(LibraryError, match="unknown style"):
            lib.find_version(bad)
        with pytest.raises(LibraryError, match="unknown style"):
            lib.delete(bad)


def test_v1_folders_are_adopted_and_malformed_ones_skipped_with_a_warning(tmp_path, caplog):
    data = tmp_path / "data"
    good = _v1_folder(data, "heart-abc123", {"schema_version": 1, "id": "heart-abc123", "name": "Heart",
                                             "version": 1, "trigger_token": "olis", "preset": "subject",
                                             "created": "2026-01-01T00:00:00",
                                             "training_config": {"class_prompt": "a shape"}})
    _v1_folder(data, "broken-000001", "{not json")
    _v1_folder(data, "notrigger-000002", {"schema_version": 1, "name": "x"})
    _v1_folder(data, "listy-000003", "[1, 2]")
    _v1_folder(data, "future-000004", {"schema_version": 99, "trigger_token": "t"})
    with caplog.at_level(logging.WARNING, logger="engine.styles.library"):
        lib = Library(data)
    assert lib.last_adoption.adopted == ("heart-abc123@v1",)
    assert {Path(w).parts[1] for w, _ in lib.last_adoption.skipped} == {"broken-000001", "notrigger-000002",
                                                                        "listy-000003", "future-000004"}
    assert "broken-000001" in caplog.text
    s = lib.get("heart-abc123")
    assert (s.name, s.preset, s.latest.folder, s.latest.class_noun) == ("Heart", "subject", good, "shape")
    lib.close()
    assert Library(data).last_adoption.adopted == ()  # adopted once


def test_a_crash_between_rename_and_commit_leaves_a_folder_that_adoption_picks_up(tmp_path, monkeypatch):
    data = tmp_path / "data"

    def crash(self, folder, **kw):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(Library, "register_folder", crash)
    with pytest.raises(KeyboardInterrupt):
        _publish(data, tmp_path, "Heart")
    monkeypatch.undo()
    lib = Library(data)
    assert [s.name for s in lib.list()] == ["Heart"] and len(lib.last_adoption.adopted) == 1


def test_new_database_migrates_and_a_newer_one_is_refused(tmp_path, monkeypatch):
    data = tmp_path / "data"
    Library(data).close()
    now = D.latest_version()
    con = sqlite3.connect(data / D.DB_NAME)
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(now,)]
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()

    # an older database is migrated forward, step by step, once
    calls = []

    def v2(c):
        calls.append(now + 1)
        c.execute("ALTER TABLE styles ADD COLUMN colour TEXT NOT NULL DEFAULT ''")

    monkeypatch.setitem(D.MIGRATIONS, now + 1, v2)
    Library(data).close()
    Library(data).close()
    assert calls == [now + 1]
    con = sqlite3.connect(data / D.DB_NAME)
    assert con.execute("SELECT version FROM schema_version").fetchone()[0] == now + 1
    con.execute("UPDATE schema_version SET version=7")
    con.commit()
    con.close()
    with pytest.raises(LibraryError, match="schema 7.*newer Stylebooth"):
        Library(data)


def test_a_failed_migration_leaves_the_database_at_its_old_schema(tmp_path, monkeypatch):
    data = tmp_path / "data"
    Library(data).close()

    def broken(c):
        c.execute("ALTER TABLE styles ADD COLUMN half TEXT")
        raise RuntimeError("disk gone")

    now = D.latest_version()
    monkeypatch.setitem(D.MIGRATIONS, now + 1, broken)
    with pytest.raises(RuntimeError):
        Library(data)
    con = sqlite3.connect(data / D.DB_NAME)
    assert con.execute("SELECT version FROM schema_version").fetchone()[0] == now
    assert "half" not in [r[1] for r in con.execute("PRAGMA table_info(styles)")]


def test_base_model_mismatch_message(tmp_path):
    data = tmp_path / "data"
    s = _publish(data, tmp_path, "Heart", fingerprint="fp-a")
    assert base_model_mismatch(s, "fp-a", "demo") is None
    assert base_model_mismatch(s, "fp-b", "sd15") == "trained on demo; you are on sd15"


def test_edits_are_validated_with_messages(tmp_path):
    data = tmp_path / "data"
    a = _publish(data, tmp_path, "Heart")
    lib = Library(data)
    with pytest.raises(LibraryError, match="give the style a name"):
        lib.rename(a.id, "   ")
    with pytest.raises(LibraryError, match="keep tags to"):
        lib.set_tags(a.id, ["x" * 100])
    with pytest.raises(LibraryError, match="at least one trigger word"):
        lib.set_trigger(a.id, 1, " , ")
    v = lib.set_trigger(a.id, 1, "sks, olis")
    assert v.trigger_token == "sks" and v.trigger_words == ("sks", "olis")
    assert json.loads((v.folder / "style.json").read_text())["trigger_token"] == "sks"


def test_a_trained_style_appears_in_the_library_with_no_extra_step(tiny_sd, tmp_path, monkeypatch):
    from PIL import Image, ImageDraw

    from engine.api import Engine
    from engine.core.config import Settings
    from engine.core.train_config import TrainConfig, presets

    monkeypatch.setattr("engine.train.output.PREVIEW_STEPS", 2)
    images = []
    for i, colour in enumerate(["red", "green", "blue"]):
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).ellipse([8 + i, 8, 56, 56 - i], fill=colour)
        img.save(tmp_path / f"c{i}.png")
        images.append(str(tmp_path / f"c{i}.png"))
    cfg = TrainConfig(**{**presets("subject"), "instance_images": tuple(images), "base_model": str(tiny_sd),
                         "max_train_steps": 2, "checkpointing_steps": 2, "validation_steps": 0,
                         "validation_prompts": (), "report_to": "none", "with_prior_preservation": False})
    engine = Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path / "data")))
    assert engine.list_styles() == []  # opens the library before training, as the app does
    result = engine.train(cfg, "Circle")
    styles = engine.library_list()
    assert [s.id for s in styles] == [result.style.id] and styles[0].name == "Circle"
    v = styles[0].latest
    assert (v.kind, v.source, v.version, v.trigger_token) == ("lora", "trained", 1, cfg.trigger_token)
    assert v.base_model_fingerprint == engine.model.fingerprint and v.preview is not None
    assert engine.list_styles()[0].label == v.label and result.style.id in v.label
    assert engine.library.file_hashes(v.id, 1).keys() >= {"lora.safetensors", "style.json", "preview.png"}
    assert engine.style_warning(v.id) is None
    engine.delete_style(v.id)
    assert engine.list_styles() == [] and [s.id for s in engine.library_list(trashed=True)] == [v.id]
    engine.undo_delete(v.id)
    assert engine.list_styles()[0].id == v.id


def test_a_corrupt_database_is_refused_with_what_to_do(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / D.DB_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(LibraryError, match="Move it away to rebuild the library"):
        Library(data)


def test_archived_styles_in_the_trash_are_listed_there(tmp_path):
    data = tmp_path / "data"
    a = _publish(data, tmp_path, "Heart")
    lib = Library(data)
    lib.archive(a.id)
    lib.delete(a.id)
    assert [s.id for s in lib.list(trashed=True)] == [a.id]
    assert lib.list(archived=None) == []


def test_threads_and_a_second_library_write_at_once(tmp_path):
    import threading

    data = tmp_path / "data"
    a = _publish(data, tmp_path, "Heart")
    lib = Library(data)
    errors = []

    def edit(i):
        try:
            for k in range(15):
                lib.set_tags(a.id, [f"t{i}", f"k{k}"])
                lib.rename(a.id, f"Heart {i}.{k}")
                lib.list("heart")
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=edit, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for n in range(3):  # another connection (a publish from a CLI run) at the same time
        _publish(data, tmp_path, f"Other {n}")
    for t in threads:
        t.join()
    assert errors == [] and len(lib.list()) == 4 and len(lib.get(a.id).tags) == 2


def test_v1_database_migrates_to_owners_with_existing_styles_owned_by_local(tmp_path, monkeypatch):
    """Studio mode's migration: a library from before accounts keeps every style, owned by "local", not shared."""
    data = tmp_path / "data"
    monkeypatch.setattr(D, "MIGRATIONS", {1: D.MIGRATIONS[1]})
    _publish(data, tmp_path, "Heart")
    monkeypatch.undo()
    lib = Library(data)
    (s,) = lib.list()
    assert (s.name, s.owner, s.shared) == ("Heart", "local", False)
    lib.set_owner(s.id, "ann")
    assert lib.set_shared(s.id, True).shared and lib.get(s.id).owner == "ann"
    lib.set_run_owner("run-1", "ann")
    lib.set_run_owner("run-1", "bob")  # the first owner stays
    assert lib.run_owners() == {"run-1": "ann"}
