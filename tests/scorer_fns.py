"""A user scorer for the `module:function` test: share of characters that are the letter x."""


def x_share(text: str) -> float:
    return text.count("x") / max(1, len(text))


def x_share_or_die(text: str) -> float:
    """x_share, except that the process kills itself (SIGKILL, as the OOM killer would) on a line holding KILLME
    while PREFPRETRAIN_TEST_KILL is set: a shard task that dies without a word."""
    import os
    import signal

    if "KILLME" in text and os.environ.get("PREFPRETRAIN_TEST_KILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    return x_share(text)
