"""Batch generation: prompts x seeds x styles (or x strengths), one job, written to disk image by image, with an
X/Y grid (labelled as A1111's X/Y plot) and a zip of the results.

Memory stays flat however big the batch: each image is written as soon as it is decoded and only a thumbnail is
pasted into the grid, so a 200-image batch never holds 200 images. Images that share a style and strength run in
sampling calls of `batch_size` (one adapter change per column, not per image). Styles are applied by the caller
(`activate`), so this module needs only the sampler and the core types.
"""
from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw, ImageFont

from engine.core.batch_config import BatchRequest
from engine.core.errors import Cancelled
from engine.core.events import BatchResult, Progress
from engine.core.files import atomic_path
from engine.generate import recipes
from engine.generate.sampler import sample, to_pil

THUMB = 256  # grid cells are at most this many pixels wide
LABEL_W = 200  # row-label column
LABEL_H = 40  # column-label row
PAD = 4


@dataclass(frozen=True)
class Cell:
    """One image of the batch and its place in the grid."""

    index: int
    row: int
    col: int
    prompt: str
    seed: int
    style: str
    strength: float


def plan(req: BatchRequest) -> tuple[list[Cell], list[str], list[str]]:
    """Every image, grouped by (style, strength) so each group is one adapter setting; plus row and column labels.

    Columns: the styles, or with `strengths` the strengths. Rows: prompt x seed (x style, with `strengths`).
    """
    seeds = [req.seed + s for s in range(req.seeds_per_prompt)]
    by_strength = bool(req.strengths)
    cols = list(req.strengths) if by_strength else list(req.styles)
    rows = [(p, s, st) for st in (req.styles if by_strength else ("",)) for p in req.lines for s in seeds]
    row_labels = [f"{p}  (seed {s})" + (f"  [{st}]" if st else "") for p, s, st in rows]
    col_labels = [f"strength {v:g}" for v in cols] if by_strength else [st or "no style" for st in cols]
    cells = []
    for c, col in enumerate(cols):
        for r, (p, s, st) in enumerate(rows):
            style, strength = (st, col) if by_strength else (col, req.style_strength)
            cells.append(Cell(len(cells), r, c, p, s, style, float(strength)))
    order = sorted(cells, key=lambda x: (x.style, x.strength, x.index))
    return order, row_labels, col_labels


def grid_size(rows: int, cols: int, cell: int) -> tuple[int, int]:
    """(width, height) of the X/Y grid: a label column and a label row around rows x cols cells."""
    return LABEL_W + cols * cell, LABEL_H + rows * cell


class Grid:
    """An X/Y plot drawn as images arrive: labels first, then each thumbnail pasted into its cell."""

    def __init__(self, row_labels: list[str], col_labels: list[str], image_size: tuple[int, int]):
        w, h = image_size
        self.cell = min(THUMB, max(w, h))
        self.scale = self.cell / max(w, h)
        self.image = Image.new("RGB", grid_size(len(row_labels), len(col_labels), self.cell), "white")
        draw, font = ImageDraw.Draw(self.image), ImageFont.load_default()
        for c, text in enumerate(col_labels):
            _text(draw, font, text, (LABEL_W + c * self.cell + PAD, PAD), self.cell - 2 * PAD, LABEL_H - 2 * PAD)
        for r, text in enumerate(row_labels):
            _text(draw, font, text, (PAD, LABEL_H + r * self.cell + PAD), LABEL_W - 2 * PAD, self.cell - 2 * PAD)

    def paste(self, cell: Cell, img: Image.Image) -> None:
        size = (max(1, round(img.width * self.scale)), max(1, round(img.height * self.scale)))
        thumb = img if img.size == size else img.resize(size, Image.Resampling.LANCZOS)
        self.image.paste(thumb, (LABEL_W + cell.col * self.cell, LABEL_H + cell.row * self.cell))

    def save(self, path: Path) -> Path:
        with atomic_path(path) as tmp:
            self.image.save(tmp, "PNG")
        return path


def _text(draw, font, text: str, xy: tuple[int, int], width: int, height: int) -> None:
    """Draw `text` wrapped to `width` pixels, dropping lines that do not fit in `height`."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    step = font.getbbox("Ag")[3] + 2
    x, y = xy
    for k, ln in enumerate(lines[:max(1, height // step)]):
        draw.text((x, y + k * step), ln, fill="black", font=font)


def write_zip(paths: list[Path], path: Path) -> Path:
    """The PNGs (recipes included) in one zip, written atomically; PNGs are already compressed, so stored."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            for p in paths:
                z.write(p, arcname=p.name)
    return path


Activate = Callable[[str, float], Callable[[str], str]]  # (style, strength) -> prompt rewriter (adds triggers)
RecipeFn = Callable[..., dict]  # (GenerateRequest, seed, width, height, prompt) -> recipe


def run_batch(req: BatchRequest, components, out_dir: Path, *, activate: Activate, recipe: RecipeFn,
              check: Callable[[], None], on_progress: Callable[[Progress], None] | None = None,
              image_embeds=None) -> BatchResult:
    """Run the whole batch; `check()` raises Cancelled to stop (what was made is kept, with a grid and zip).
    `image_embeds`: an instant style's embedding for every image (its IP-Adapter already attached), as `sample`
    takes it."""
    t0 = time.perf_counter()
    c = components
    cells, row_labels, col_labels = plan(req)
    width, height = req.width or c.default_size, req.height or c.default_size
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = Grid(row_labels, col_labels, (width, height)) if req.make_grid else None
    total, steps = len(cells), req.num_inference_steps
    made: dict[int, Path] = {}
    stamp = int(time.time() * 1000)
    cancelled = False
    groups: list[list[Cell]] = []
    for cell in cells:  # consecutive cells with one (style, strength), at most batch_size per sampling call
        if groups and (groups[-1][0].style, groups[-1][0].strength) == (cell.style, cell.strength) \
                and len(groups[-1]) < req.batch_size:
            groups[-1].append(cell)
        else:
            groups.append([cell])
    try:
        check()
        for group in groups:
            rewrite = activate(group[0].style, group[0].strength)
            prompts = [rewrite(cell.prompt) for cell in group]

            def cb(i, n, latents, done=len(made)):
                check()
                if on_progress:
                    on_progress(Progress(done, total, f"image {done + 1}-{done + len(group)} of {total}, "
                                                      f"step {i + 1}/{n}"))

            imgs = sample(c, prompts, [req.negative_prompt] * len(group), [cell.seed for cell in group],
                          num_inference_steps=steps, guidance_scale=req.guidance_scale,
                          guidance_rescale=req.guidance_rescale, scheduler=req.scheduler, height=height,
                          width=width, callback=cb, image_embeds=image_embeds)
            for cell, prompt, img in zip(group, prompts, to_pil(imgs)):
                gen = req.generate_request(cell.prompt, cell.seed, cell.style, cell.strength)
                path = out_dir / f"{stamp}-{cell.index:04d}-r{cell.row}-c{cell.col}-s{cell.seed}.png"
                made[cell.index] = recipes.save_png(img, recipe(gen, cell.seed, width, height, prompt), path)
                if grid is not None:
                    grid.paste(cell, img)
            del imgs  # the group's images are on disk (and in the grid as thumbnails) now
            if on_progress:
                on_progress(Progress(len(made), total, f"{len(made)}/{total} images"))
    except Cancelled:
        cancelled = True
    paths = [made[k] for k in sorted(made)]
    grid_path = zip_path = None
    if paths and grid is not None:
        grid_path = grid.save(out_dir / f"{stamp}-grid.png")
    if paths and req.make_zip:
        zip_path = write_zip(paths + ([grid_path] if grid_path else []), out_dir / f"{stamp}-batch.zip")
    return BatchResult(paths, grid_path, zip_path, total, cancelled, time.perf_counter() - t0)
