"""Per-image captions for training: kohya-style `.txt` sidecar files (`heart-1.png` + `heart-1.txt`).

A caption says what differs between the training images (colours, background, pose), so that the trigger token
is left to mean only what they share (DreamBooth's subject, or a style). Without captions every image is trained
on the one instance prompt and the token soaks up everything in the pictures, colours included.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable

from engine.core.config import ConfigError

__all__ = ["read_captions", "class_prompts_from_captions", "TOKEN_PLACEHOLDER", "MAX_CAPTION_CHARS"]

TOKEN_PLACEHOLDER = "{token}"  # written in a sidecar where the trigger goes, so one set of files fits any token
MAX_CAPTION_CHARS = 1000


def _read(path: Path, token: str | None) -> str:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name}: the caption is not UTF-8 text; save it as UTF-8 and upload it again") from None
    except OSError as e:
        raise ConfigError(f"{path.name}: the caption cannot be read ({e.strerror or e}); upload it again") from None
    text = " ".join((text.replace(TOKEN_PLACEHOLDER, token) if token else text).split())  # one line: newlines and runs of spaces → " "
    if len(text) > MAX_CAPTION_CHARS:
        raise ConfigError(f"{path.name}: the caption has {len(text)} characters; keep it under {MAX_CAPTION_CHARS} "
                          "(the text encoder reads only the first 77 tokens anyway)")
    if token is not None and not re.search(rf"(?<![A-Za-z0-9]){re.escape(token)}(?![A-Za-z0-9])", text):
        raise ConfigError(f"{path.name}: the caption {text!r} does not name the trigger token {token!r}; write the "
                          f"token (or {TOKEN_PLACEHOLDER}) where the subject or style is, e.g. "
                          f"'a photo of {TOKEN_PLACEHOLDER} shape in red on a blue background'")
    return text


def read_captions(images: Iterable[str | Path], token: str | None, default: str,
                  text_files: Iterable[str | Path] = ()) -> tuple[tuple[str, ...], list[str]]:
    """(one caption per image, notices). An image's caption is the `.txt` of the same stem among `text_files`
    (uploads) or next to the image on disk; an image without one gets `default` (the instance prompt).
    Returns () when no image has a caption, so that configs without captions stay as they were. `token` None:
    class images, whose captions must not need the trigger."""
    images = [Path(p) for p in images]
    by_stem = {Path(t).stem: Path(t) for t in text_files if Path(t).suffix.lower() == ".txt"}
    found = []
    for img in images:
        side = by_stem.get(img.stem) or img.with_suffix(".txt")
        found.append(_read(side, token) if side.is_file() else None)
    if all(c is None for c in found):
        return (), []
    notices = [f"{img.name} has no caption file ({img.stem}.txt); it is trained on the instance prompt {default!r}"
               for img, c in zip(images, found) if c is None]
    unused = sorted(set(by_stem) - {img.stem for img in images})
    if unused:
        notices.append(f"caption files without an image of the same name were ignored: "
                       f"{', '.join(s + '.txt' for s in unused)}")
    return tuple(c if c is not None else default for c in found), notices


def _with_article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def class_prompts_from_captions(captions: Iterable[str], token: str, members: Iterable[str], *,
                                class_noun: str = "", n: int = 12) -> list[str]:
    """Class prompts for prior preservation (Ruiz et al. 2023, sec. 3.3) made from the instance captions: each
    caption with its trigger replaced by a member of the class, so the priors cover the very contexts the captions
    train ("a photo of olis shape in red on a blue background" -> "a photo of a circle in red on a blue background").
    Written by hand, such lists drift from the captions; derived, they follow every change of the examples.

    `members`: real members of the class: for a subject the class word itself ("dog") or kinds of it ("circle",
    "square", ...); for a style the words that sit where the trigger sits ("striped", "solid"). "{token}
    {class_noun}" (with its article, if any) becomes "a <member>"; a bare trigger becomes the member, with "a"/"an"
    fixed before it. Captions and members are paired round-robin (caption j mod C with member (j + j // lcm(C, M))
    mod M, which visits every pair once), so any first `n` spread over all captions and members; duplicates are
    dropped; the order is fixed.
    """
    caps = [" ".join(c.split()) for c in captions if c.strip()]
    mem = [m.strip() for m in members if m.strip()]
    if not caps or not mem:
        return []
    tok = re.escape(token)
    noun = rf"\s+{re.escape(class_noun)}(?![A-Za-z0-9])" if class_noun else r"(?!)"
    with_noun = re.compile(rf"(?:(?<![A-Za-z0-9])(?:a|an|the)\s+)?(?<![A-Za-z0-9]){tok}{noun}", re.IGNORECASE)
    bare = re.compile(rf"(?:(?<![A-Za-z0-9])(a|an)\s+)?(?<![A-Za-z0-9]){tok}(?![A-Za-z0-9])", re.IGNORECASE)

    def replace(cap: str, member: str) -> str:
        if with_noun.search(cap):
            return with_noun.sub(_with_article(member), cap)
        return bare.sub(lambda m: _with_article(member) if m.group(1) else member, cap)

    out: list[str] = []
    lcm = math.lcm(len(caps), len(mem))
    for j in range(len(caps) * len(mem)):  # caption j mod C with member (j + j // lcm) mod M: every pair once
        p = replace(caps[j % len(caps)], mem[(j + j // lcm) % len(mem)])
        if p not in out:
            out.append(p)
        if len(out) == n:
            break
    return out
