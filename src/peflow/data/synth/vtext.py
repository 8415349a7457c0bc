"""Video text: noisy web-style titles and descriptions (correlated with the
content but full of typos, hashtags and marketing noise) and the accurate,
detailed human caption."""

from __future__ import annotations

from typing import Any

import numpy as np

from peflow.data.synth import vocab
from peflow.data.synth.captions import article, choice

_HYPE = ("AMAZING", "so satisfying", "must watch", "you won't believe", "WOW", "oddly satisfying",
         "relaxing", "4K", "HD", "best ever", "(official)", "full version", "NEW")
_FILLER = ("lol", "compilation", "part 2", "episode 7", "vlog", "tutorial", "asmr", "2024", "for kids",
           "learn shapes", "animation", "loop", "edit", "trending", "fyp", "viral")
_OUTRO = ("Don't forget to like and subscribe!", "Follow for more videos like this.",
          "Music by an unknown artist.", "All rights reserved, no copyright infringement intended.",
          "Check the link in my bio!", "Made this in 5 minutes lol.", "Turn on notifications!!",
          "Thanks for watching.", "Comment your favorite shape below.")


def typo(rng: np.random.Generator, word: str) -> str:
    """Swap, drop or double one letter."""
    if len(word) < 4:
        return word
    i = int(rng.integers(1, len(word) - 1))
    kind = int(rng.integers(3))
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]


def noisy(rng: np.random.Generator, text: str, p_typo: float = 0.12) -> str:
    return " ".join(typo(rng, w) if rng.random() < p_typo else w for w in text.split())


def title(rng: np.random.Generator, v: dict[str, Any]) -> str:
    """A short web title: some true words, some noise."""
    p, act = v["objects"][0], vocab.ACTION_BY_NAME[v["category"]]
    words = []
    if rng.random() < 0.7:
        words.append(p["colour"])
    if rng.random() < 0.8:
        words.append(choice(rng, vocab.SHAPE_WORDS[p["category"]]))
    if rng.random() < 0.7:
        words.append(choice(rng, (act.gerund, act.name, act.answer)))
    if rng.random() < 0.3:
        rng.shuffle(words)
    words = [choice(rng, _HYPE)] * (rng.random() < 0.6) + words + [choice(rng, _FILLER)] * (rng.random() < 0.7)
    text = noisy(rng, " ".join(words))
    if rng.random() < 0.3:
        text = text.upper()
    if rng.random() < 0.5:
        text += " " + " ".join("#" + w.replace(" ", "") for w in (choice(rng, _FILLER), p["category"]))
    return text + choice(rng, ("", "!!!", " !!", "...", " | shapes"))


def description(rng: np.random.Generator, v: dict[str, Any]) -> str:
    """A longer web description: partial content, irrelevant chatter, outro."""
    p, act = v["objects"][0], vocab.ACTION_BY_NAME[v["category"]]
    body = []
    if rng.random() < 0.75:
        body.append(choice(rng, ("In this video", "Watch as", "Here", "Today")) + " "
                    + ("the " + p["colour"] + " " if rng.random() < 0.6 else "this ")
                    + p["category"] + " " + act.verb + ".")
    if rng.random() < 0.5:
        body.append(choice(rng, ("I made this animation for my class.", "Just testing my new editing software.",
                                 "This took forever to render.", "Perfect for toddlers learning shapes and colours.",
                                 "Part of my daily animation challenge.")))
    if rng.random() < 0.4:
        body.append(f"Background: {v['background']}.")
    body.append(choice(rng, _OUTRO))
    if rng.random() < 0.6:
        tags = {p["category"], p["colour"], choice(rng, _FILLER), choice(rng, ("shapes", "colors", "animation"))}
        body.append(" ".join("#" + t.replace(" ", "") for t in sorted(tags)))
    return noisy(rng, " ".join(body), 0.06)


#: How human captions word each action (the zero-shot prompts of peflow.evaluate.video say it the same way).
DETAIL = {
    "move left": "slides steadily from the right side of the frame to the left side",
    "move right": "slides steadily from the left side of the frame to the right side",
    "move up": "moves steadily from the bottom of the frame up to the top",
    "move down": "moves steadily from the top of the frame down to the bottom",
    "grow": "grows from a small shape into a large one while staying in place",
    "shrink": "shrinks from a large shape into a small one while staying in place",
    "bounce": "bounces up and down twice like a ball",
    "shake": "shakes rapidly from side to side without moving away",
}


def human_caption(v: dict[str, Any], rng: np.random.Generator) -> str:
    """An accurate, detailed description of the whole video."""
    p, act = v["objects"][0], vocab.ACTION_BY_NAME[v["category"]]
    tex = vocab.TEXTURE_WORDS.get(p["texture"])
    desc = " ".join(w for w in (p["size"] if p["size"] != "medium" else "medium-sized", p["colour"],
                                tex[0] if tex else "", p["category"]) if w)
    subject = article(desc)
    where = choice(rng, vocab.POSITION_WORDS[p["position"]])
    if act.name == "rotate":
        how = f"rotates {'clockwise' if v['motion']['direction'] > 0 else 'counter-clockwise'} about its center"
        how += f" {where}"
    elif act.name == "change colour":
        how = f"stays {where} and gradually changes colour from {p['colour']} to {p['end_colour']}"
    elif act.name in ("grow", "shrink", "bounce", "shake"):
        how = f"{where} {DETAIL[act.name]}"
    else:
        how = DETAIL[act.name]
    text = f"{subject[0].upper()}{subject[1:]} {how}, {choice(rng, vocab.BACKGROUND_WORDS[v['background']])}."
    others = v["objects"][1:]
    if others:
        names = [article(f"{o['size']} {o['colour']} {o['category']}") for o in others]
        still = " and ".join(names)
        verb = "stays" if len(others) == 1 else "stay"
        text += f" Meanwhile {still} {verb} still in the background."
    text += f" The clip lasts {v['num_frames']} frames."
    return text
