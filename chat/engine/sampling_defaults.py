"""Sampling defaults: what a request gets for a value its client left out (issue 14).

Qwen3-VL Instruct's model card recommends temperature 0.7, top_p 0.8, top_k 20 and presence_penalty
1.5 (`CARD`). A checkpoint may say otherwise in its generation_config.json (`do_sample`,
`temperature`, `top_p`, `top_k`): those values win, one by one, where the file has them; anything
it does not say (presence and frequency penalties are not generation-config fields) comes from the
card. The loader reads the file (`from_generation_config`), the engine carries the result as
`engine.sampling_defaults`, and the page and the API fill a missing value from it
(`Settings.clamp_params`). With --engine-url there is no checkpoint here: the card's values are sent.

No torch and no web framework here: config, page and API import it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling values used where a request names none."""

    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20  # 0: off
    presence_penalty: float = 1.5
    frequency_penalty: float = 0.0
    source: str = "model card"  # where they came from, for the log and the README's example

    def as_dict(self) -> dict:
        """Plain dict (for /health-like answers and logs)."""
        return asdict(self)


CARD = SamplingDefaults()


def defaults_of(engine: object) -> SamplingDefaults:
    """The engine's defaults (read from its checkpoint), else the model card's."""
    found = getattr(engine, "sampling_defaults", None)
    return found if isinstance(found, SamplingDefaults) else CARD


def from_generation_config(config: dict | None, name: str = "generation_config.json") -> SamplingDefaults:
    """The card's values overridden by what a checkpoint's generation config says (a dict of its fields).

    `do_sample: false` makes the default greedy (temperature 0). Values of the wrong type or out of
    range are ignored (the card's stay), with a warning.
    """
    if not config:
        return CARD
    found: dict = {}

    def number(key: str, low: float, high: float, cast=float):
        value = config.get(key)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            log.warning("%s: ignoring %s=%r (not a number from %s to %s); the model card's value is used",
                        name, key, value, low, high)
            return
        found[key] = cast(value)

    number("temperature", 0.0, 2.0)
    number("top_p", 0.0, 1.0)
    number("top_k", 0, 1_000_000, int)
    if "top_p" in found and found["top_p"] <= 0.0:
        found.pop("top_p")  # 0 would keep only the top token through a side door; treat it as unset
    if config.get("do_sample") is False:
        found["temperature"] = 0.0
    if not found:
        return CARD
    return replace(CARD, **found, source=name)


def read_generation_config(source: str) -> SamplingDefaults:
    """The defaults for a checkpoint (a folder or a hub id) from its generation_config.json, through
    transformers' GenerationConfig; the card's values when it has none or it cannot be read."""
    try:
        from transformers import GenerationConfig

        config = GenerationConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:  # no such file (most often), or one that is not valid
        log.info("no usable generation_config.json for %s (%s); sampling defaults from the model card",
                 source, exc.__class__.__name__)
        return CARD
    # Only what the file says: the difference from GenerationConfig's own defaults (None in transformers 5.x).
    said = {k: v for k, v in config.to_diff_dict().items() if v is not None}
    defaults = from_generation_config(said)
    log.info("sampling defaults (%s): temperature %s, top_p %s, top_k %s, presence_penalty %s", defaults.source,
             defaults.temperature, defaults.top_p, defaults.top_k, defaults.presence_penalty)
    return defaults
