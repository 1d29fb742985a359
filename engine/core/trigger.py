"""Trigger words: which are too common to teach a new concept (the model already gives them a meaning), and which
rare one to suggest instead. Used by TrainConfig (word list only) and at training start (with the model's tokenizer).
"""
from __future__ import annotations

from engine.core.config import ConfigError

# Rare CLIP BPE tokens that are one token each and no English word (checked against CLIP's vocabulary: "olis" is
# id 49397, near the end of the merge list, so the base model has almost no prior for it). "sks" is avoided: it
# is a rifle model and drags guns into pictures.
TRIGGER_CANDIDATES = ("olis", "ohwx", "phol", "zyk")  # "zwx", often suggested, is two CLIP tokens
# Words a trigger must not be: they carry meaning the model already has, so the new concept would blur with it.
# Embedded so TrainConfig can check without a model: the most frequent English words, plus the words image prompts
# use most (colours, subjects, styles, media). With the model's tokenizer, `check_trigger_token` also refuses any
# whole-word token among CLIP's most frequent merges (see FREQUENT_TOKEN_RANK), which covers far more words.
_COMMON_WORDS = frozenset("""
a about above after again against all also am an and any are art as at back be because been before being below
between both but by can could day did do does doing down during each even few first for from further get give go
good great had has have having he her here hers herself him himself his how i if in into is it its itself just
know like little long look make man many me more most much my myself new no nor not now of off old on once one
only or other our ours ourselves out over own people say see she should so some such take than that the their
theirs them themselves then there these they thing think this those through time to too two under until up us
use very want was way we well were what when where which while who whom why will with woman work would year you
your yours yourself yourselves
red orange yellow green blue purple pink brown black white gray grey gold golden silver dark light bright color
colour colors colours
dog dogs cat cats bird birds horse fish bear lion tiger wolf fox rabbit cow pig sheep duck owl deer monkey
dragon animal animals pet puppy kitten
person persons men women girl girls boy boys child children kid kids baby lady guy face faces head eye eyes hair
hand hands body portrait selfie
car cars truck bike bus train plane boat ship house home building city street road tree trees flower flowers
forest mountain mountains sea ocean beach river lake sky cloud clouds sun moon star stars water fire snow rain
photo photos photograph picture pictures image images painting paintings drawing drawings sketch illustration
render rendering style styles anime manga cartoon comic comics realistic photorealistic digital oil watercolor
watercolour pencil ink poster logo icon shape shapes circle square triangle
big small large tiny beautiful cute pretty happy sad new old young high low best top
""".split())
FREQUENT_TOKEN_RANK = 10_000  # CLIP's vocabulary is in BPE merge order: ids below this are its most frequent words

def is_common_word(token: str, tokenizer=None) -> bool:
    """True if `token` is a word the model already knows: in the embedded list, or (given a CLIP tokenizer) one
    whole-word token among the first FREQUENT_TOKEN_RANK entries of the vocabulary.

    CLIP's vocab.json lists the 512 byte tokens, then every BPE merge in the order it was learned, i.e. by frequency
    in CLIP's training captions: "red</w>" is 736, "car</w>" 1615, "anime</w>" 6469, while "olis</w>" is 49397.
    A tokenizer without merges (tiny test models) splits every word into characters and adds nothing here.
    """
    word = token.lower()
    if word in _COMMON_WORDS:
        return True
    if tokenizer is None:
        return False
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1 or ids[0] >= FREQUENT_TOKEN_RANK:
        return False
    return tokenizer.convert_ids_to_tokens(ids[0]) == f"{word}</w>"  # a whole word, not a piece of one


def check_trigger_token(token: str, tokenizer=None) -> None:
    """Raise ConfigError with a rare suggestion if `token` is a common word (see `is_common_word`)."""
    if is_common_word(token, tokenizer):
        suggestion = suggest_trigger_token(tokenizer, avoid=(token.lower(),)) if tokenizer is not None else next(
            t for t in TRIGGER_CANDIDATES if t != token.lower())
        raise ConfigError(f"`trigger_token` {token!r} is a common word the model already knows, so the new concept "
                          f"would blur with it; use a rare token such as {suggestion!r} (it has no meaning yet)")


def suggest_trigger_token(tokenizer, avoid: tuple[str, ...] = ()) -> str:
    """A rare, short trigger that the tokenizer keeps as ONE token and that is not an English word.

    Tries TRIGGER_CANDIDATES in order; with a tokenizer that splits all of them (tiny test tokenizers), returns
    the candidate with the fewest tokens.
    """
    def n_tokens(word: str) -> int:
        return len(tokenizer(word, add_special_tokens=False).input_ids)

    options = [w for w in TRIGGER_CANDIDATES if w not in avoid] or list(TRIGGER_CANDIDATES)
    for w in options:
        if n_tokens(w) == 1:
            return w
    return min(options, key=lambda w: (n_tokens(w), options.index(w)))
