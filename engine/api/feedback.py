"""The Engine's feedback methods (engine/feedback/): ratings, "Use my feedback" (FABRIC) during generation, and
refinement of a style into its next version (liked-image tuning + Diffusion-DPO). A mixin of engine.api.Engine,
which owns the state these methods use."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from engine.api.support import charged, iterate
from engine.core.caller import LOCAL, Caller
from engine.core.errors import AccessDenied, ConfigError
from engine.styles.store import StyleInfo


class FeedbackMethods:
    def _feedback(self, styles, user: str, on: bool, params, do_cfg: bool, seed: int):
        """The FABRIC context for one sample() call (a no-op context when off or when nothing is rated)."""
        from engine.feedback.fabric import FabricParams, fabric

        if not on or not styles:
            return contextlib.nullcontext(None)
        s = styles[0][0]
        rated = self.ratings.list(s.id, None, user=user)  # every version's ratings: the taste, not the version
        liked = [self._open_rated(r) for r in rated if r.liked]
        disliked = [self._open_rated(r) for r in rated if r.disliked]
        return fabric(self.model.components, [i for i in liked if i], [i for i in disliked if i],
                      params or FabricParams(), do_cfg=do_cfg, seed=seed)

    def _open_rated(self, r):
        from PIL import Image

        try:
            with Image.open(self.data_dir / r.image) as im:
                return im.convert("RGB")
        except OSError:
            return None  # the PNG was deleted: its rating stays, it just no longer steers

    # ---- feedback: ratings and refinement ------------------------------------------------------------------
    @property
    def ratings(self):
        """The ratings table (engine/feedback/ratings.py) in the library's database."""
        from engine.feedback.ratings import Ratings

        lib = self.library
        with self._library_lock:
            if getattr(self, "_ratings", None) is None:
                self._ratings = Ratings(lib.db, self.data_dir)
            return self._ratings

    def _rater(self, caller, rater: str | None) -> str | None:
        """Whose ratings a caller may read: their own (studio users), anyone's or all (admins, the local user)."""
        if caller.admin:
            return rater
        if rater is not None and rater != caller.name:
            raise AccessDenied("you can only see your own ratings")
        return caller.name

    def _rated_style(self, caller, style_id: str | None) -> None:
        """Listing by style: a style the caller may not see is "unknown", as everywhere (no probing of ids). The
        local user and admins may list ratings of styles that are gone (their images are still rated)."""
        if style_id is not None and not caller.admin:
            self._style_for(caller, style_id)

    def rate_image(self, image, rating, tags=(), user: str | Caller = LOCAL):
        """Rate one of `user`'s generated images (its path as GeneratedImage.path gave it, under outputs/<user>/):
        1..5 stars or "up"/"down"; rating again changes the rating and tags. Returns the stored Rating. Another
        user's image is refused as "not one of your outputs"."""
        return self.ratings.rate(image, rating, tags, self.caller(user).name)

    def remove_rating(self, image, user: str | Caller = LOCAL) -> bool:
        """Remove `user`'s rating of an image; False when it had none."""
        return self.ratings.remove(image, self.caller(user).name)

    def list_ratings(self, style_id: str | None = None, version: int | None = None, *, user: str | Caller = LOCAL,
                     rater: str | None = None):
        """Ratings (oldest first), by style id, version and rater. `user` is the caller: a studio user sees only
        their own ratings; admins and the local user see everyone's (or `rater`'s)."""
        caller = self.caller(user)
        self._rated_style(caller, style_id)
        return self.ratings.list(style_id, version, user=self._rater(caller, rater))

    def export_ratings(self, style_id: str | None = None, *, user: str | Caller = LOCAL,
                       rater: str | None = None) -> str:
        """Ratings the caller may see (as list_ratings) with their full recipes as a JSON document."""
        caller = self.caller(user)
        self._rated_style(caller, style_id)
        return self.ratings.export(style_id, user=self._rater(caller, rater))

    def rating_summary(self, style_id: str, *, user: str | Caller = LOCAL, rater: str | None = None) -> list[dict]:
        """Per version of a style: how many ratings, liked share and mean stars (the Feedback tab's plot)."""
        caller = self.caller(user)
        who = self._rater(caller, rater)
        out = []
        for v in self.style_versions(style_id, user=caller):
            rs = self.ratings.list(style_id, v.version, user=who)
            if rs:
                out.append({"version": v.version, "ratings": len(rs), "liked": sum(r.liked for r in rs) / len(rs),
                            "mean": sum(r.rating for r in rs) / len(rs)})
        return out

    def set_version_defaults(self, style_ref: str, *, strength: float = 1.0, unet_weight: float = 1.0,
                             te_weight: float = 1.0, blocks: dict | None = None,
                             user: str | Caller = LOCAL) -> dict:
        """Save a version's defaults ("id@vN"): overall strength, UNet vs text-encoder weight and per-block UNet
        weights ({"down", "mid", "up"}, see ratings.clean_blocks), applied (times the request's strength) whenever
        that version is used. Only whoever may change the style (its owner, an admin) may. Returns them."""
        s = self.library.find_version(style_ref)
        self._style_for(self.caller(user), s.id, change=True)
        with self._lock:  # a generation running now keeps the weights it started with
            return self.ratings.set_defaults(s.id, s.version, strength, unet_weight, te_weight, blocks)

    def version_defaults(self, style_ref: str, *, user: str | Caller = LOCAL) -> dict:
        """A version's defaults (1.0 each unless set), for anyone who may use the style."""
        s = self.library.find_version(style_ref)
        self._style_for(self.caller(user), s.id)
        return self.ratings.defaults(s.id, s.version)

    @charged("refine")
    def refine(self, req, on_event: Callable | None = None, *, user: str = "local", job_id: str | None = None,
               resume_run: str | None = None):
        """Make version N+1 of a style from the ratings of version N (engine/feedback/refine.py): rating-weighted
        tuning on liked images + Diffusion-DPO on liked x disliked pairs with v(N) as reference. v(N) is never
        modified; Cancel stops within one step and saves nothing. Returns a RefineResult.

        Studio mode: only the style's owner (or an admin) may refine it; it is charged as a training run and
        refunded when it fails or is cancelled (support.charged). A user's refinement learns from their own
        ratings only (an admin's from everyone's, or `req.raters`').
        `resume_run`: continue that interrupted or cancelled refinement (resumable_refines) from its checkpoint, with
        the request and ratings it started with (use resume_refine)."""
        from engine.core.feedback_config import RefineResult
        from engine.feedback.refine import live_policy, new_run_dir, refine, run_request

        caller = self.caller(user)
        style = self.library.find_version(req.style)
        self._style_for(caller, style.id, change=True)  # studio: only its owner (or an admin) refines a style
        with self._job("refine", caller.name, job_id) as job:
            if job.token.is_set():
                return RefineResult(None, style, 0, cancelled=True)
            if resume_run is None:
                ratings = [r for r in self.ratings.list(style.id, style.version)
                           if (not req.raters or r.user in req.raters) and caller.can_see(r.user)]
                run_dir = new_run_dir(self.data_dir)
                run_dir.mkdir(parents=True)
                self.library.set_run_owner(run_dir.name, caller.name)
            else:  # checked again in the job: a second Resume of the same run waited for this one to finish
                if not any(r["run_id"] == resume_run for r in self.resumable_refines(user=caller)):
                    raise ConfigError("that refinement is no longer resumable (finished, or resumed already)")
                run_dir = self.data_dir / "runs" / resume_run
                ids = run_request(run_dir)[1]
                by_id = {r.id: r for r in self.ratings.list(style.id, style.version) if caller.can_see(r.user)}
                if any(i not in by_id for i in ids):
                    raise ConfigError("some ratings this refinement started with were removed; start a new one")
                ratings = [by_id[i] for i in ids]
            # v(N)'s adapter is trained in the loaded model (no second copy of the base model in memory), under the
            # model lock held for the whole job; the cached adapter is v(N) again afterwards.
            from engine.styles.adapters import AdapterCache

            m = self.model
            if self._adapters is None:
                self._adapters = AdapterCache(m.components, fuse=self.fuse_styles)
            self._detach_instant()  # an instant style's IP-Adapter must not be part of the trained model
            return refine(m.source, self.data_dir, self.library, ratings, req, style, device=self.device,
                          dtype=self.dtype, on_event=on_event, stop_event=job.token,
                          policy=live_policy(m, self._adapters, style), run_dir=run_dir,
                          resume=resume_run is not None)

    def resumable_refines(self, *, user: str | Caller = LOCAL) -> list[dict]:
        """The caller's refinements that can continue (interrupted or cancelled after a step; admins: all), newest
        first: {"run_id", "style", "state", "step", "total"}."""
        from engine.feedback.refine import resumable_refines

        caller = self.caller(user)
        owners = self.library.run_owners()
        return [r for r in resumable_refines(self.data_dir / "runs") if caller.can_see(owners.get(r["run_id"], LOCAL))]

    def resume_refine(self, run_id: str, on_event: Callable | None = None, *, user: str | Caller = LOCAL,
                      job_id: str | None = None):
        """Continue a refinement from resumable_refines() (by its id, never a path) from its newest checkpoint: the
        same request and ratings, so the new version equals an uninterrupted run. Charged as a new refinement (a
        cancelled one was refunded)."""
        from engine.feedback.refine import run_request

        if not any(r["run_id"] == run_id for r in self.resumable_refines(user=user)):
            raise ConfigError("that refinement is no longer resumable (finished, or resumed already); refresh the "
                              "list")
        req = run_request(self.data_dir / "runs" / run_id)[0]
        return self.refine(req, on_event, user=user, job_id=job_id, resume_run=run_id)

    def revert_version(self, style_id: str, version: int, *, user: str | Caller = LOCAL) -> StyleInfo:
        """Drop a refined version the artist did not keep (only the newest); the previous one is newest again.
        Only whoever may change the style may."""
        self._style_for(self.caller(user), style_id, change=True)
        with self._lock:
            if self._adapters is not None:
                self._adapters.forget({style_id})
            return self.library.drop_newest_version(style_id, version)

    def refine_iter(self, req, *, user: str = "local", job_id: str | None = None) -> Iterator:
        """`refine` in a worker thread: yields TrainProgress / TrainLog events, then the RefineResult."""
        import uuid

        from engine.core.feedback_config import RefineResult

        job_id = job_id or uuid.uuid4().hex
        return iterate(lambda emit: self.refine(req, emit, user=user, job_id=job_id), RefineResult,
                       self._waiting(job_id, user))

    def resume_refine_iter(self, run_id: str, *, user: str = "local", job_id: str | None = None) -> Iterator:
        """`resume_refine` in a worker thread: yields its events, then the RefineResult."""
        import uuid

        from engine.core.feedback_config import RefineResult

        job_id = job_id or uuid.uuid4().hex
        return iterate(lambda emit: self.resume_refine(run_id, emit, user=user, job_id=job_id), RefineResult,
                       self._waiting(job_id, user))
