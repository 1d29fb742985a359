"""The Engine's style-library methods (engine/styles/library.py behind ownership checks): list, search, edit,
trash, import and export. A mixin of engine.api.Engine, which owns the state these methods use."""
from __future__ import annotations

from pathlib import Path


from engine.core.caller import LOCAL, Caller
from engine.styles.interop import ExportResult, ImportResult, export_style, import_file
from engine.styles.library import Library, LibraryStyle, base_model_mismatch
from engine.styles.store import StyleInfo



class LibraryMethods:
    # ---- styles and the library ------------------------------------------------------------------------------
    @property
    def library(self) -> Library:
        """The style library (<data_dir>/stylebooth.db); opened, migrated and adopting old folders on first use."""
        with self._library_lock:
            if self._library is None:
                self._library = Library(self.data_dir)
            return self._library

    def list_styles(self, *, user: str | Caller = LOCAL) -> list[StyleInfo]:
        """The newest version of every style the caller may use that is neither archived nor in the trash, newest
        first (the Generate tab's picker; its labels carry id and version, so styles that share a name stay apart)."""
        return [s.latest for s in self.library_list(user=user)]

    def library_list(self, query: str = "", *, tag: str | None = None, preset: str | None = None,
                     archived: bool | None = False, trashed: bool = False,
                     user: str | Caller = LOCAL) -> list[LibraryStyle]:
        """Search the caller's library (their own styles, studio-shared ones; admins: all): `query` matches name,
        id, tags, trigger words, description; filters by tag, preset ("subject"/"style"), archived (False: hide,
        True: only archived, None: both); `trashed` lists the caller's trash."""
        caller = self.caller(user)
        found = self.library.list(query, tag=tag, preset=preset, archived=archived, trashed=trashed)
        if trashed:
            return [s for s in found if caller.can_change(s.owner)]
        return [s for s in found if caller.can_see(s.owner, s.shared)]

    def get_style(self, style_id: str, *, user: str | Caller = LOCAL) -> LibraryStyle:
        """One style with all its versions (oldest first)."""
        return self._style_for(self.caller(user), style_id)

    def style_versions(self, style_id: str, *, user: str | Caller = LOCAL) -> list[StyleInfo]:
        """Every version of a style, oldest first."""
        return list(self.get_style(style_id, user=user).versions)

    def _change(self, user, style_id: str) -> str:
        return self._style_for(self.caller(user), style_id, change=True).id

    def rename_style(self, style_id: str, name: str, *, user: str | Caller = LOCAL) -> LibraryStyle:
        """Rename a style (names need not be unique; labels show the id)."""
        return self.library.rename(self._change(user, style_id), name)

    def tag_style(self, style_id: str, tags: str | list[str], *, user: str | Caller = LOCAL) -> LibraryStyle:
        """Replace a style's tags ("a, b" or a list); tags are lower-cased and de-duplicated."""
        return self.library.set_tags(self._change(user, style_id), tags)

    def describe_style(self, style_id: str, description: str, *, user: str | Caller = LOCAL) -> LibraryStyle:
        """Set a style's description."""
        return self.library.describe(self._change(user, style_id), description)

    def set_style_trigger(self, style_id: str, version: int, words: str | list[str], *,
                          user: str | Caller = LOCAL) -> StyleInfo:
        """Edit a version's trigger words ("a, b" or a list; the first is put into prompts)."""
        return self.library.set_trigger(self._change(user, style_id), version, words)

    def archive_style(self, style_id: str, archived: bool = True, *, user: str | Caller = LOCAL) -> LibraryStyle:
        """Hide a style from the picker and the default list (False brings it back)."""
        return self.library.archive(self._change(user, style_id), archived)

    def share_style(self, style_id: str, shared: bool = True, *, user: str | Caller = LOCAL) -> LibraryStyle:
        """Share a style with the whole studio (everyone may see and use it; only its owner or an admin changes
        it), or stop sharing it."""
        return self.library.set_shared(self._change(user, style_id), shared)

    def delete_style(self, style_id: str, *, user: str | Caller = LOCAL) -> LibraryStyle:
        """Move a style to the trash (undo with `undo_delete` until `empty_trash`)."""
        return self.library.delete(self._change(user, style_id))

    def undo_delete(self, style_id: str, *, user: str | Caller = LOCAL) -> LibraryStyle:
        """Restore a style from the trash with all its versions."""
        return self.library.undo_delete(self._change(user, style_id))

    def empty_trash(self, *, user: str | Caller = LOCAL) -> int:
        """Delete the caller's styles in the trash for good (rows and folders; admins: everyone's); how many."""
        caller = self.caller(user)
        with self._lock:  # adapters of the removed styles are unloaded too
            gone = {s.id for s in self.library.list(trashed=True, archived=None) if caller.can_change(s.owner)}
            n = self.library.empty_trash(only=gone) if gone else 0
            if self._adapters is not None and gone:
                self._adapters.forget(gone)
            return n

    def import_lora(self, path: str | Path, *, name: str = "", trigger: str = "", preset: str = "style",
                    tags: str | list[str] = (), user: str | Caller = LOCAL) -> ImportResult:
        """Import an uploaded .safetensors LoRA (diffusers/PEFT or kohya/A1111 keys, LoCon included) or textual-
        inversion embedding as a new library style owned by the caller, matched against the loaded base model.

        `path` is the file Gradio's upload handed the UI. Pickles are refused by content; a file that matches 0 of
        its N layers is refused ("0 of N layers matched"); a partial match imports with a warning in the result.
        The trigger word comes from `trigger`, else the file's metadata or name (editable: `set_style_trigger`).
        """
        caller = self.caller(user)
        with self._lock:  # reads the loaded model's layers; a model switch must not happen halfway
            m = self.model
            res = import_file(self.library, path, m.components, model_fingerprint=m.fingerprint,
                              model_name=m.name, name=name, trigger=trigger, preset=preset, tags=tags)
            self.library.set_owner(res.style.id, caller.name)
            return res

    def export_style(self, style_id: str, fmt: str = "a1111", *, version: int | None = None,
                     out_dir: str | Path | None = None, user: str | Caller = LOCAL) -> ExportResult:
        """Write a style version the caller may see as one .safetensors: fmt "a1111" (kohya keys for A1111/ComfyUI,
        named like the "Lora:" entry in our PNGs) or "diffusers" (PEFT keys). Metadata (trigger words, tags, base
        model, ss_* training settings) goes in the header. Written to `out_dir`, default <data_dir>/exports/<style
        id>/ (inside the data dir, which Gradio does not serve: the UI copies the file to its upload folder)."""
        style_id = self.get_style(style_id, user=user).id
        out = Path(out_dir) if out_dir else self.data_dir / "exports" / style_id
        return export_style(self.library, style_id, fmt, out, version=version)

    def style_warning(self, style_id: str, *, user: str | Caller = LOCAL) -> str | None:
        """"trained on X; you are on Y" when the style's newest version was made on another base model."""
        v = self.library.find_version(style_id)
        self._style_for(self.caller(user), v.id)
        m = self.model
        return base_model_mismatch(v, m.fingerprint, m.name)
