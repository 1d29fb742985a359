"""The Library tab: every style as a card (preview grid, name, tags, trigger, base model, preset, versions); search and
filter; rename, re-tag, describe, archive, delete with undo; import a LoRA or embedding; export for A1111/ComfyUI or
diffusers.

`LibraryHandlers` holds the work as plain methods over dicts keyed by names, so tests drive it without a browser;
`build_library_tab` lays the components out. Styles are picked by the id the engine listed, never by a path.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from engine.core.errors import ConfigError

from .downloads import copy_for_download
from .session import user_of
from .instant_panel import build_instant_panel

PRESETS = [("All", ""), ("Subjects", "subject"), ("Styles", "style")]
EXPORT_FORMATS = [("A1111 / ComfyUI (kohya keys)", "a1111"), ("diffusers (PEFT keys)", "diffusers")]
NO_STYLE = "Pick a style from the list or click its card."


def _placeholder() -> Path:
    """The card picture of a style with no preview grid (imported LoRAs): a plain tile that says so."""
    from PIL import Image, ImageDraw

    path = Path(tempfile.gettempdir()) / "stylebooth-no-preview.png"
    if not path.is_file():
        img = Image.new("RGB", (256, 256), (226, 228, 233))
        ImageDraw.Draw(img).text((70, 120), "no preview yet", fill=(90, 90, 100))
        img.save(path)
    return path


def _card_caption(s) -> str:
    v = s.latest
    tags = f" · #{' #'.join(s.tags)}" if s.tags else ""
    state = " · archived" if s.archived else (" · in the trash" if s.trashed else "")
    shared = f" · shared by {s.owner}" if getattr(s, "shared", False) else ""
    if v.kind == "instant":  # its picture is the strip of its reference images
        return f"{s.name} ({s.id} v{v.version}) · instant style (reference images){tags}{state}{shared}"
    return f"{s.name} ({s.id} v{v.version}) · {s.preset} · trigger “{v.trigger_token}”{tags}{state}{shared}"


class LibraryHandlers:
    """What the Library tab's buttons do, as plain methods over one Engine."""

    def __init__(self, engine, user: str = "local"):
        self.engine = engine
        self.user = user  # the default caller (tests, the local app); events pass the logged-in user

    # ---- listing -------------------------------------------------------------------------------------------
    def listing(self, query: str = "", tag: str = "", preset: str = "", show: str = "active",
                user: str | None = None) -> dict[str, Any]:
        """Cards (gallery), the style picker and a count, for the search box and filters: the caller's styles and
        the studio-shared ones (admins and the local user: all)."""
        if self.engine is None or show not in ("active", "archived", "all", "trash"):
            return {"cards": [], "choices": [], "count": "", "card_ids": []}
        archived = {"active": False, "archived": True, "all": None, "trash": None}[show]
        try:
            styles = self.engine.library_list((query or "").strip(), tag=(tag or "").strip() or None,
                                              preset=preset or None, archived=archived, trashed=show == "trash",
                                              user=user or self.user)
        except ConfigError as e:
            raise gr.Error(str(e)) from None
        pictures = copy_for_download([s.latest.preview or _placeholder() for s in styles])
        cards = [(str(p), _card_caption(s)) for p, s in zip(pictures, styles)]
        choices = [(s.label, s.id) for s in styles]
        word = "style" if len(styles) == 1 else "styles"
        return {"cards": cards, "choices": choices,
                "count": f"{len(styles)} {word}" + (" in the trash" if show == "trash" else ""),
                "card_ids": [s.id for s in styles]}

    def details(self, style_id: str | None, user: str | None = None) -> dict[str, Any]:
        """The selected style's card text and its editable fields."""
        if not style_id:
            return {"details": NO_STYLE, "name": "", "tags": "", "description": "", "trigger": ""}
        user = user or self.user
        s = self._get(style_id, user)
        v = s.latest
        versions = ", ".join(f"v{x.version} ({x.created[:10]})" for x in s.versions)
        warning = None if s.trashed else self.engine.style_warning(s.id, user=user)
        lines = [f"### {s.name}", f"`{s.id}` · {s.preset} · versions: {versions}",
                 f"Trigger: **{v.trigger_token}** · recommended strength {getattr(v, 'recommended_strength', 1.0)}",
                 f"Base model: {getattr(v, 'base_model', '') or 'unknown'} "
                 f"(fingerprint `{(v.base_model_fingerprint or '')[:10]}`)"]
        if s.tags:
            lines.append("Tags: " + ", ".join(s.tags))
        if s.description:
            lines.append(s.description)
        if warning:
            lines.append(f"**⚠ {warning}.** Load that model under *Model* to use this style.")
        if getattr(self.engine, "studio", None) is not None:
            lines.append(f"Owner: {s.owner}" + (" · shared with the studio" if s.shared else " · private"))
        if s.trashed:
            lines.append("_In the trash: **Undo delete** brings it back until the trash is emptied._")
        return {"details": "\n\n".join(lines), "name": s.name, "tags": ", ".join(s.tags),
                "description": s.description, "trigger": ", ".join(getattr(v, "trigger_words", ()) or
                                                                    (v.trigger_token,))}

    # ---- edits ---------------------------------------------------------------------------------------------
    def edit(self, action: str, style_id: str | None, value: Any = None, user: str | None = None) -> dict[str, Any]:
        """rename / tags / describe / trigger / archive / unarchive / share / unshare / delete / undo: then the
        fresh details. The engine checks that the caller owns the style (or is an admin)."""
        if not style_id:
            raise gr.Error(NO_STYLE)
        e, u = self.engine, user or self.user
        ops = {"rename": lambda: e.rename_style(style_id, value or "", user=u),
               "tags": lambda: e.tag_style(style_id, value or "", user=u),
               "describe": lambda: e.describe_style(style_id, value or "", user=u),
               "trigger": lambda: e.set_style_trigger(style_id, self._get(style_id, u).latest.version, value or "",
                                                      user=u),
               "archive": lambda: e.archive_style(style_id, True, user=u),
               "unarchive": lambda: e.archive_style(style_id, False, user=u),
               "share": lambda: e.share_style(style_id, True, user=u),
               "unshare": lambda: e.share_style(style_id, False, user=u),
               "delete": lambda: e.delete_style(style_id, user=u),
               "undo": lambda: e.undo_delete(style_id, user=u)}
        if action not in ops:
            raise KeyError(action)  # a wiring bug
        try:
            ops[action]()
        except ConfigError as err:
            raise gr.Error(str(err)) from None
        done = {"rename": "Renamed.", "tags": "Tags saved.", "describe": "Description saved.",
                "trigger": "Trigger words saved.", "archive": "Archived: hidden from the Generate tab's list.",
                "unarchive": "Back in the Generate tab's list.",
                "share": "Shared: everyone in the studio can see and use it; only you (or an admin) can change it.",
                "unshare": "No longer shared: only you (and admins) see it.",
                "delete": "Moved to the trash. **Undo delete** brings it back until the trash is emptied.",
                "undo": "Restored with all its versions."}[action]
        return {**self.details(style_id, u), "status": done}

    def empty_trash(self, user: str | None = None) -> dict[str, Any]:
        n = self.engine.empty_trash(user=user or self.user)
        return {"status": f"Deleted {n} style(s) for good." if n else "The trash was already empty."}

    # ---- import / export -----------------------------------------------------------------------------------
    def import_file(self, path: str | None, name: str = "", trigger: str = "", preset: str = "style",
                    tags: str = "", user: str | None = None) -> dict[str, Any]:
        """Import an uploaded .safetensors LoRA or embedding; the status says how many layers matched."""
        if not path:
            raise gr.Error("Choose a .safetensors LoRA or embedding file to import.")
        try:
            res = self.engine.import_lora(path, name=name or "", trigger=trigger or "", preset=preset or "style",
                                          tags=tags or "", user=user or self.user)
        except ValueError as e:  # ConfigError, ModelFileError, UnsafeModelFile: each says what to do
            raise gr.Error(str(e)) from None
        s = res.style
        msg = (f"Imported **{s.name}** (`{s.id}`) as a {res.kind}: {res.matched} of {res.total} layers matched the "
               f"loaded model. Use it in Generate with the trigger **{s.trigger_token}**.")
        for w in res.warnings:
            msg += f"\n\n⚠ {w}"
            gr.Warning(w)
        return {"status": msg, "style_id": s.id}

    def export(self, style_id: str | None, fmt: str = "a1111", user: str | None = None) -> dict[str, Any]:
        """One .safetensors to download, named as our PNGs' "Lora:" entry names it (A1111 format)."""
        if not style_id:
            raise gr.Error(NO_STYLE)
        try:
            if fmt not in dict((v, k) for k, v in EXPORT_FORMATS):
                raise ConfigError(f"pick an export format: {', '.join(v for _, v in EXPORT_FORMATS)}")
            res = self.engine.export_style(style_id, fmt, user=user or self.user)
        except ConfigError as e:
            raise gr.Error(str(e)) from None
        copy = copy_for_download([Path(res.path)])[0]
        where = ("Put it in A1111's `models/Lora` or ComfyUI's `models/loras` folder." if fmt == "a1111" else
                 "Load it with diffusers' `pipe.load_lora_weights(path)`.")
        return {"export_file": str(copy), "status": f"Exported `{copy.name}`. {where}"}

    def _get(self, style_id: str, user: str | None = None):
        try:
            return self.engine.get_style(style_id, user=user or self.user)
        except ConfigError as e:
            raise gr.Error(str(e)) from None


@dataclass
class LibraryTab:
    handlers: LibraryHandlers
    components: dict[str, Any]
    refresh: dict[str, Any]  # event kwargs that re-list the styles (the app runs it on page load and tab select)


def build_library_tab(engine) -> LibraryTab:
    """Lay out the Library tab over one Engine; call inside a `gr.Tab`."""
    h = LibraryHandlers(engine)
    c: dict[str, Any] = {}
    card_ids = gr.State([])
    with gr.Row(equal_height=True):
        c["query"] = gr.Textbox(label="Search", placeholder="name, tag or trigger word", scale=3, elem_id="lib-query")
        c["tag"] = gr.Textbox(label="Tag", placeholder="e.g. ink", scale=1, elem_id="lib-tag")
        c["preset"] = gr.Dropdown(PRESETS, value="", label="Kind", scale=1)
        c["show"] = gr.Radio([("Active", "active"), ("Archived", "archived"), ("All", "all"), ("Trash", "trash")],
                             value="active", label="Show", scale=2, elem_id="lib-show")
        refresh = gr.Button("Refresh", size="sm", scale=0, elem_id="lib-refresh")
    c["count"] = gr.Markdown(elem_id="lib-count")
    c["cards"] = gr.Gallery(label="Styles", columns=4, height=320, allow_preview=False, elem_id="lib-cards")
    with gr.Row():
        with gr.Column(scale=3):
            c["style"] = gr.Dropdown(label="Style", choices=[], elem_id="lib-style")
            c["details"] = gr.Markdown(NO_STYLE, elem_id="lib-details")
            c["status"] = gr.Markdown(elem_id="lib-status")
        with gr.Column(scale=2):
            with gr.Accordion("Edit", open=False):
                c["name"] = gr.Textbox(label="Name", elem_id="lib-name")
                rename = gr.Button("Rename", size="sm")
                c["tags"] = gr.Textbox(label="Tags (comma separated)", elem_id="lib-tags")
                save_tags = gr.Button("Save tags", size="sm", elem_id="lib-save-tags")
                c["description"] = gr.Textbox(label="Description", lines=2)
                describe = gr.Button("Save description", size="sm")
                c["trigger"] = gr.Textbox(label="Trigger words (the first goes into prompts)")
                trigger = gr.Button("Save trigger words", size="sm")
                with gr.Row():
                    archive = gr.Button("Archive", size="sm")
                    unarchive = gr.Button("Unarchive", size="sm")
                with gr.Row(visible=getattr(engine, "studio", None) is not None):
                    share = gr.Button("Share with the studio", size="sm", elem_id="lib-share")
                    unshare = gr.Button("Stop sharing", size="sm", elem_id="lib-unshare")
                with gr.Row():
                    delete = gr.Button("Delete", size="sm", variant="stop", elem_id="lib-delete")
                    undo = gr.Button("Undo delete", size="sm", elem_id="lib-undo")
                    empty = gr.Button("Empty trash", size="sm", variant="stop")
            with gr.Accordion("Export", open=False):
                c["fmt"] = gr.Radio(EXPORT_FORMATS, value="a1111", label="Format")
                export = gr.Button("Export", size="sm", elem_id="lib-export")
                c["export_file"] = gr.File(label="Download", interactive=False, elem_id="lib-export-file")
            with gr.Accordion("Import a LoRA or embedding", open=True):
                c["import_file"] = gr.File(label=".safetensors file", file_types=[".safetensors"], type="filepath",
                                           elem_id="lib-import-file")
                c["import_name"] = gr.Textbox(label="Name (optional)", elem_id="lib-import-name")
                c["import_trigger"] = gr.Textbox(label="Trigger word (optional: else from the file)")
                c["import_preset"] = gr.Radio([("Style", "style"), ("Subject", "subject")], value="style",
                                              label="Kind")
                c["import_tags"] = gr.Textbox(label="Tags (optional)")
                do_import = gr.Button("Import", variant="primary", elem_id="lib-import")
            c["instant"] = build_instant_panel(engine, c["style"])

    filters = [c["query"], c["tag"], c["preset"], c["show"]]
    detail_outs = [c["details"], c["name"], c["tags"], c["description"], c["trigger"]]

    def show_list(request: gr.Request, query, tag, preset, show, keep=None):
        out = h.listing(query, tag, preset, show, user=user_of(engine, request))
        ids = [i for _, i in out["choices"]]
        value = keep if keep in ids else (ids[0] if ids else None)
        return out["cards"], gr.Dropdown(choices=out["choices"], value=value), out["count"], out["card_ids"]

    def show_details(request: gr.Request, style_id):
        d = h.details(style_id, user_of(engine, request))
        return [d[k] for k in ("details", "name", "tags", "description", "trigger")]

    def pick_card(ids, evt: gr.SelectData):
        return ids[evt.index] if 0 <= evt.index < len(ids) else None

    def do_edit(action):
        def fn(request: gr.Request, style_id, value=None):
            d = h.edit(action, style_id, value, user_of(engine, request))
            return [d["status"]] + [d[k] for k in ("details", "name", "tags", "description", "trigger")]
        return fn

    list_outs = [c["cards"], c["style"], c["count"], card_ids]
    lib = dict(api_visibility="private")
    for ev in (refresh.click, c["query"].submit, c["tag"].submit, c["preset"].change, c["show"].change):
        ev(show_list, filters, list_outs, queue=False, **lib)
    c["style"].change(show_details, [c["style"]], detail_outs, queue=False, **lib)
    c["instant"]["trained"].then(show_details, [c["style"]], detail_outs, queue=False, **lib)  # shows the new v2
    c["cards"].select(pick_card, [card_ids], [c["style"]], queue=False, **lib)
    edits = [(rename, "rename", c["name"]), (save_tags, "tags", c["tags"]), (describe, "describe", c["description"]),
             (trigger, "trigger", c["trigger"]), (archive, "archive", None), (unarchive, "unarchive", None),
             (share, "share", None), (unshare, "unshare", None),
             (delete, "delete", None), (undo, "undo", None)]
    for button, action, field in edits:
        inputs = [c["style"]] + ([field] if field is not None else [])
        button.click(do_edit(action), inputs, [c["status"]] + detail_outs, queue=False, **lib).then(
            show_list, filters + [c["style"]], list_outs, queue=False, **lib)
    def on_empty(request: gr.Request):
        return h.empty_trash(user_of(engine, request))["status"]

    def on_export(request: gr.Request, sid, fmt):
        out = h.export(sid, fmt, user_of(engine, request))
        return [out[k] for k in ("export_file", "status")]

    empty.click(on_empty, None, [c["status"]], **lib).then(
        show_list, filters, list_outs, queue=False, **lib)
    export.click(on_export, [c["style"], c["fmt"]],
                 [c["export_file"], c["status"]], **lib)

    def on_import(request: gr.Request, path, name, trig, preset, tags, *filt):
        out = h.import_file(path, name, trig, preset, tags, user=user_of(engine, request))
        return (out["status"], *show_list(request, *filt, keep=out["style_id"]), None)  # None: ready for the next file

    do_import.click(on_import, [c["import_file"], c["import_name"], c["import_trigger"], c["import_preset"],
                                c["import_tags"], *filters],
                    [c["status"], c["cards"], c["style"], c["count"], card_ids, c["import_file"]],
                    concurrency_id="gpu",
                    concurrency_limit=1, **lib)
    return LibraryTab(h, c, dict(fn=show_list, inputs=filters, outputs=list_outs, queue=False, **lib))
