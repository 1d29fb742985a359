"""Form values -> dataclass values, where the UI knows what its components send.

The dataclasses (engine/config.py) accept only values of their fields' types: True is not 1 and 20.0 is not 20.
Gradio's Slider sends floats even with step=1, and a Number box sends a float unless precision=0, so the UI turns
a whole float from a numeric component into an int here, for the fields that such a component shows. A direct API
call that sends a float with a fraction, a bool or a string for a number still reaches the dataclass unchanged and
is refused there with the field's name.
"""
from __future__ import annotations

from typing import Any, Iterable

import gradio as gr


def whole_numbers(values: dict[str, Any], int_fields: Iterable[str]) -> dict[str, Any]:
    """`values` with the numeric components' whole floats (20.0) as ints, for the named int fields only."""
    out = dict(values)
    for name in int_fields:
        v = out.get(name)
        if isinstance(v, float):
            if not v.is_integer():
                raise gr.Error(f"`{name}` must be a whole number but is {v}")
            out[name] = int(v)
    return out


def int_fields(cls, components: dict[str, Any]) -> tuple[str, ...]:
    """The int fields of `cls` that are shown by a numeric component (Slider or Number) in `components`."""
    import dataclasses

    numeric = (gr.Slider, gr.Number)
    return tuple(f.name for f in dataclasses.fields(cls)
                 if f.type in ("int", int) and isinstance(components.get(f.name), numeric))
