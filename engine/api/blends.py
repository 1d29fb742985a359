"""The Engine's blend and batch methods: interpolation strips, baking blends into styles, prompt x seed x style
batches with grids and zips. A mixin of engine.api.Engine, which owns the state these methods use."""
from __future__ import annotations

import datetime as dt
import time
from typing import Callable, Iterator


from engine.core.batch_config import BatchRequest
from engine.core.blend_config import BakeRequest, BlendStripRequest
from engine.core.errors import Cancelled
from engine.core.events import (BakeResult, BatchResult, BlendStripResult, GeneratedImage, Progress)
from engine.generate import recipes
from engine.generate.batch import Grid, run_batch
from engine.generate.sampler import sample, to_pil
from engine.styles.blend import check_same_base
from engine.api.support import StripCell, charged, iterate, with_triggers



class BlendMethods:
    # ---- blends --------------------------------------------------------------------------------------------
    @charged("generate")
    def blend_strip(self, req: BlendStripRequest, on_progress: Callable[[Progress], None] | None = None, *,
                    user: str = "local", job_id: str | None = None) -> BlendStripResult:
        """K images of one prompt and seed, weights from all style A to all style B, as one job: both LoRAs are
        loaded once, then only their weights change (set_adapters) between images. Also writes a labelled strip."""
        t0 = time.perf_counter()
        weights = req.weights
        with self._job("blend", user, job_id) as job:
            c = self.model.components
            size = (req.width or c.default_size, req.height or c.default_size)
            steps, total = req.num_inference_steps, req.num_inference_steps * len(weights)
            done: list[GeneratedImage] = []
            stamp = int(time.time() * 1000)
            strip = Grid([req.prompt], [f"A {wa:.2f} / B {wb:.2f}" for wa, wb in weights], size)
            try:
                job.token.check()
                for k, w in enumerate(weights):
                    gen = req.generate_request(w)
                    styles = self._activate_styles(gen.active_styles)
                    prompt = with_triggers(req.prompt, styles)

                    def cb(i, n, latents, k=k):
                        job.token.check()
                        if on_progress:
                            on_progress(Progress(k * steps + i + 1, total, f"image {k + 1}/{len(weights)}, "
                                                                           f"step {i + 1}/{n}"))

                    img = to_pil(sample(c, [prompt], [req.negative_prompt], [req.seed], num_inference_steps=steps,
                                        guidance_scale=req.guidance_scale, guidance_rescale=req.guidance_rescale,
                                        scheduler=req.scheduler, width=size[0], height=size[1], callback=cb))[0]
                    recipe = self._recipe(gen, req.seed, size[0], size[1], prompt, styles)
                    path = self._out_dir(user) / f"{stamp}-blend-{k:02d}.png"
                    done.append(GeneratedImage(img, recipe, recipes.save_png(img, recipe, path)))
                    strip.paste(StripCell(0, k), img)
            except Cancelled:
                return BlendStripResult(done, weights[:len(done)], None, True, time.perf_counter() - t0)
            strip_path = strip.save(self._out_dir(user) / f"{stamp}-blend-strip.png")
            return BlendStripResult(done, weights, strip_path, False, time.perf_counter() - t0)

    def blend_strip_iter(self, req: BlendStripRequest, *, user: str = "local",
                         job_id: str | None = None) -> Iterator[Progress | BlendStripResult]:
        """`blend_strip` in a worker thread: yields Progress, then the BlendStripResult."""
        return iterate(lambda emit: self.blend_strip(req, emit, user=user, job_id=job_id), BlendStripResult)

    @charged("bake")
    def bake_blend(self, req: BakeRequest, *, user: str = "local") -> BakeResult:
        """Save a blend as a new style (exact rank concatenation, or truncated SVD to `req.rank`)."""
        from engine.styles.blend import bake_style

        styles = [self.library.find_version(sid) for sid in req.blend.styles]
        with self._job("blend", user, None):
            check_same_base(styles, self.model.fingerprint, self.model.name)
            info, rank, rel = bake_style(self.data_dir, req, styles)
        return BakeResult(info, req.method, rank, rel)

    # ---- batches -------------------------------------------------------------------------------------------
    @charged("generate")
    def generate_batch(self, req: BatchRequest, on_progress: Callable[[Progress], None] | None = None, *,
                       user: str = "local", job_id: str | None = None) -> BatchResult:
        """Prompts x seeds x styles (or strengths) as one job: PNGs with recipes written as they are made, an X/Y
        grid and a zip, under outputs/<user>/<date>/batch-<time>/. Progress counts images over the whole batch."""
        with self._job("batch", user, job_id) as job:
            for sid in set(req.styles) - {""}:
                self.library.find_version(sid)  # an unknown id fails before any image is made

            current: list = []  # the styles of the group being sampled, for its recipes
            instant, image_embeds = self._activate_instant(req.instant_style, req.instant_strength,
                                                           req.instant_style_only)

            def activate(style: str, strength: float):
                current[:] = self._activate_styles(((style, strength),) if style else ())
                styles = list(current)
                return lambda p: with_triggers(p, styles)

            def recipe(gen, seed, width, height, prompt):
                return self._recipe(gen, seed, width, height, prompt, current, instant)

            out = self._out_dir(user) / f"batch-{dt.datetime.now().strftime('%H%M%S')}-{job.id[:6]}"
            return run_batch(req, self.model.components, out, activate=activate, recipe=recipe,
                             check=job.token.check, on_progress=on_progress, image_embeds=image_embeds)

    def generate_batch_iter(self, req: BatchRequest, *, user: str = "local",
                            job_id: str | None = None) -> Iterator[Progress | BatchResult]:
        """`generate_batch` in a worker thread: yields Progress (images done / total), then the BatchResult."""
        return iterate(lambda emit: self.generate_batch(req, emit, user=user, job_id=job_id), BatchResult)
