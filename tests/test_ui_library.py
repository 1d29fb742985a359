"""The Library tab's handlers over a real Engine (tiny model): import a LoRA, see its card, edit, delete and undo,
export for A1111; and the tab is wired into the app."""
from __future__ import annotations

import json

import gradio as gr
import pytest

from engine.api import Engine
from engine.core.config import Settings
from lora_support import trained_like_lora
from ui.app import build_app
from ui.library_tab import LibraryHandlers


@pytest.fixture(scope="module")
def engine(tiny_sd, tmp_path_factory):
    return Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path_factory.mktemp("data"))))


@pytest.fixture(scope="module")
def lora(tiny_sd, tmp_path_factory):
    return trained_like_lora(tiny_sd, tmp_path_factory.mktemp("lora"))


@pytest.fixture
def h(engine):
    return LibraryHandlers(engine)


def test_import_then_list_edit_delete_undo_and_export(h, engine, lora):
    out = h.import_file(str(lora), name="Ink lines", trigger="inkz", tags="ink, lines")
    sid = out["style_id"]
    assert "layers matched the loaded model" in out["status"] and "**inkz**" in out["status"]
    listed = h.listing()
    assert (f"Ink lines ({sid} v1, style, trigger 'inkz')", sid) in listed["choices"]
    assert listed["count"] == "1 style"
    d = h.details(sid)
    assert "### Ink lines" in d["details"] and d["tags"] == "ink, lines" and d["trigger"] == "inkz"

    assert h.listing("ink")["choices"] and not h.listing("nothing-like-this")["choices"]
    assert h.listing(tag="lines")["choices"] and not h.listing(tag="other")["choices"]
    h.edit("rename", sid, "Ink lines v2")
    h.edit("tags", sid, "ink")
    assert h.details(sid)["name"] == "Ink lines v2" and h.details(sid)["tags"] == "ink"

    out = h.edit("delete", sid)
    assert "trash" in out["status"] and h.listing()["choices"] == []
    assert [i for _, i in h.listing(show="trash")["choices"]] == [sid]
    h.edit("undo", sid)
    assert [i for _, i in h.listing()["choices"]] == [sid]
    assert sid in [s.id for s in engine.list_styles()]  # back in the Generate tab's picker

    exported = h.export(sid, "a1111")
    raw = open(exported["export_file"], "rb").read()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert any(k.startswith("lora_unet_") for k in header) and "Exported" in exported["status"]


def test_bad_files_and_missing_choices_are_plain_errors(h, tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(gr.Error):
        h.import_file(str(bad))
    with pytest.raises(gr.Error, match="Choose a .safetensors"):
        h.import_file(None)
    with pytest.raises(gr.Error, match="Pick a style"):
        h.export(None)
    with pytest.raises(gr.Error):
        h.details("no-such-style")


def test_library_tab_is_in_the_app(engine):
    demo = build_app(engine)
    names = {f.name for f in dict(demo.fns).values()}
    assert {"show_list", "on_import", "show_details"} <= names


def test_studio_an_import_belongs_to_its_importer_and_sharing_is_the_owners_call(tiny_sd, lora, tmp_path):
    """Studio mode through the Library tab's handlers: ann imports, bob does not see it until ann shares it, and
    even then bob can use (export) but not change it; the admin can."""
    eng = Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path / "data")))
    st = eng.enable_studio()
    for name, role in (("ann", "user"), ("bob", "user"), ("boss", "admin")):
        st.accounts.add(name, f"{name}-password", role)
    h = LibraryHandlers(eng)
    sid = h.import_file(str(lora), name="Ann ink", trigger="inkz", user="ann")["style_id"]
    assert eng.library.get(sid).owner == "ann"
    assert h.listing(user="bob")["choices"] == [] and h.listing(user="ann")["count"] == "1 style"
    with pytest.raises(gr.Error, match="unknown style"):
        h.details(sid, user="bob")
    with pytest.raises(gr.Error, match="unknown style"):
        h.export(sid, "a1111", user="bob")
    with pytest.raises(gr.Error, match="unknown style"):
        h.edit("share", sid, user="bob")
    assert "Shared" in h.edit("share", sid, user="ann")["status"]
    assert [i for _, i in h.listing(user="bob")["choices"]] == [sid]
    assert "Owner: ann · shared with the studio" in h.details(sid, user="bob")["details"]
    assert h.export(sid, "a1111", user="bob")["export_file"]
    with pytest.raises(gr.Error, match="only its owner or an admin"):
        h.edit("rename", sid, "mine now", user="bob")
    assert h.edit("rename", sid, "Studio ink", user="boss")["name"] == "Studio ink"
