"""A user scorer for the `module:function` test: share of characters that are the letter x."""


def x_share(text: str) -> float:
    return text.count("x") / max(1, len(text))
